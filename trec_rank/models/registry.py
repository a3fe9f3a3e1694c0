"""Model registry: a name -> (params dataclass, builder) table. Adding a model = one line here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trec_rank.config.typed import ConfigError, from_dict


@dataclass(frozen=True)
class ModelSpec:
    params: type
    over_arch: Callable[..., nn.Module]  # (cfg, params, device) -> over-arch module


def _specs() -> dict[str, ModelSpec]:
    from trec_rank.models import base, din, esmm, hstu, multitask, towers

    return {
        "base": ModelSpec(base.BaseParams, base.BaseOverArch),
        "din": ModelSpec(din.DinParams, din.DinOverArch),
        "shared_bottom": ModelSpec(towers.SharedBottomParams, multitask.builder("shared_bottom")),
        "moe": ModelSpec(towers.MoEParams, multitask.builder("moe")),
        "mmoe": ModelSpec(towers.MoEParams, multitask.builder("mmoe")),
        "cgc": ModelSpec(towers.CGCParams, multitask.builder("cgc")),
        "ple": ModelSpec(towers.PLEParams, multitask.builder("ple")),
        "esmm": ModelSpec(esmm.EsmmParams, esmm.EsmmOverArch),
        "hstu": ModelSpec(hstu.HSTUParams, hstu.HSTUOverArch),  # HSTU as a ranking over-arch (hstu.py)
    }


def check_params(name: str, params: dict[str, Any]) -> Any:
    specs = _specs()
    if name not in specs:
        raise ConfigError(f"model.name: unknown model '{name}' (known: {', '.join(sorted(specs))})")
    return from_dict(specs[name].params, params, "model.params")


def build_model(cfg, device: torch.device | None = None) -> nn.Module:  # noqa: ANN001
    """The serving model (batch -> logits by task), built on `device` (meta: shard with DMP later)."""
    from trec_rank.models.embeddings import build_ebc, build_ec
    from trec_rank.models.ranking import RankingModel

    device = device if device is not None else torch.device("meta")
    params = check_params(cfg.model.name, cfg.model.params)
    over = _specs()[cfg.model.name].over_arch(cfg, params, device)
    return RankingModel(build_ebc(cfg.schema, device), build_ec(cfg.schema, device), over)
