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
    from trec_rank.models import base

    return {"base": ModelSpec(base.BaseParams, base.BaseOverArch)}


def check_params(name: str, params: dict[str, Any]) -> Any:
    specs = _specs()
    if name not in specs:
        raise ConfigError(f"model.name: unknown model '{name}' (known: {', '.join(sorted(specs))})")
    return from_dict(specs[name].params, params, "model.params")


def build_model(cfg, device: torch.device = torch.device("meta")) -> nn.Module:  # noqa: ANN001
    """The serving model (batch -> logits by task), built on `device` (meta: shard with DMP later)."""
    from trec_rank.models.embeddings import build_ebc, build_ec
    from trec_rank.models.ranking import RankingModel

    params = check_params(cfg.model.name, cfg.model.params)
    over = _specs()[cfg.model.name].over_arch(cfg, params, device)
    return RankingModel(build_ebc(cfg.schema, device), build_ec(cfg.schema, device), over)
