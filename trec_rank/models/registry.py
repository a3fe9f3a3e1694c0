"""Model registry: model name -> over-arch builder. Adding a model = its params in config/models.py
and one line in each table.

Over-arches receive what they read - the schema, the tasks and their typed params - never the
whole experiment, so they can be built from any config that provides those three.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from trec_rank.config.experiment import ExperimentConfig
from trec_rank.models import base, din, esmm, hstu, multitask
from trec_rank.models.embeddings import build_ebc, build_ec
from trec_rank.models.ranking import RankingModel
from trec_rank.models.regularizer import MiniBatchL2

OverArch = Callable[..., nn.Module]  # (schema, tasks, params, device) -> over-arch module
OVER_ARCHES: dict[str, OverArch] = {
    "base": base.BaseOverArch, "din": din.DinOverArch, "shared_bottom": multitask.builder("shared_bottom"),
    "moe": multitask.builder("moe"), "mmoe": multitask.builder("mmoe"), "cgc": multitask.builder("cgc"),
    "ple": multitask.builder("ple"), "esmm": esmm.EsmmOverArch,
    "hstu": hstu.HSTUOverArch,  # HSTU as a ranking over-arch (hstu.py)
}


def build_model(cfg: ExperimentConfig, device: torch.device | None = None,
                id_counts: dict[str, np.ndarray] | None = None) -> nn.Module:
    """The serving model (batch -> logits by task), built on `device` (meta: shard with DMP later).

    `id_counts` (table -> training-split id counts, `trec_rank.data.frequency.train_id_counts`) feed
    DIN's mini-batch-aware L2; only training with it on needs them."""
    device = device if device is not None else torch.device("meta")
    over = OVER_ARCHES[cfg.model.name](cfg.schema, cfg.model.tasks, cfg.model.typed_params, device)
    model = RankingModel(build_ebc(cfg.schema, device), build_ec(cfg.schema, device), over)
    for module in model.modules():
        if isinstance(module, MiniBatchL2):
            module.counts = id_counts
    return model
