"""Model registry: name -> over-arch builder (adding a model = its params in config/models.py and one
line in each table). Over-arches receive what they read - schema, tasks, typed params - not the experiment."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import nn

from trec_rank.config.encoder import EncoderParams
from trec_rank.config.experiment import ExperimentConfig
from trec_rank.config.models import BaseParams, DinParams
from trec_rank.config.schema import Schema
from trec_rank.models import din, esmm, hstu
from trec_rank.models.embeddings import build_ebc, build_ec
from trec_rank.models.multitask import MultiTaskOverArch
from trec_rank.models.ranking import RankingModel
from trec_rank.models.regularizer import MiniBatchL2


def base_over_arch(schema: Schema, tasks: list[str], params: BaseParams, device: torch.device) -> nn.Module:
    """The base model is DIN's over-arch with a bare encoder (every feature pooled) and a ReLU MLP."""
    encoder = EncoderParams(history_pooling=params.history_pooling)
    return din.DinOverArch(schema, tasks, DinParams(encoder, params.hidden, "relu", params.dropout), device)


OVER_ARCHES: dict[str, Callable[..., nn.Module]] = {  # (schema, tasks, params, device) -> over-arch module
    "base": base_over_arch, "din": din.DinOverArch, "esmm": esmm.EsmmOverArch,
    **{kind: partial(MultiTaskOverArch, kind=kind) for kind in ("shared_bottom", "moe", "mmoe", "cgc", "ple")},
    "hstu": hstu.HSTUOverArch,  # HSTU as a ranking over-arch (hstu.py)
}
# An over-arch's parameter layout, raised when its parameters change name or shape: checkpoints carry it in
# their fingerprint, so one written for the old layout is refused by name, not by a missing key deep in DCP.
# Tower models: 2 = experts, gates, towers and heads stored stacked (towers.py, layers.StackedMLP).
STATE_LAYOUTS: dict[str, int] = {kind: 2 for kind in ("shared_bottom", "moe", "mmoe", "cgc", "ple")}


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
