"""Deep Interest Network (Zhou et al., KDD 2018): target attention + Dice MLP + per-task heads.

The encoder attends each configured behaviour group with the target item as query (unnormalised
weights), concatenates user/context/candidate features, and the top MLP (paper: 200-80 with Dice)
scores it. Mini-batch-aware L2 and the explicit-feedback task are encoder options, so they are
switched on per config (see configs/ml100k_din.yaml and configs/ml100k_din_feedback.yaml).
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from trec_rank.config.models import DinParams
from trec_rank.config.schema import Schema
from trec_rank.data.batch import Batch
from trec_rank.models.dice import make_activation
from trec_rank.models.encoder import FeatureEncoder
from trec_rank.models.layers import MLP
from trec_rank.models.ranking import AUX_LOSS


class DinOverArch(nn.Module):
    """(pooled, jagged, dense, side[, batch]) -> {task: logit [B]} (+ AUX_LOSS in training)."""

    def __init__(self, schema: Schema, tasks: list[str], params: DinParams, device: torch.device) -> None:
        super().__init__()
        self.encoder = FeatureEncoder(schema, params.encoder, device)
        self.mlp = MLP(self.encoder.out_dim, params.hidden, dropout=params.dropout, device=device,
                       act=make_activation(params.activation, device))
        self.heads = nn.ModuleDict({t: nn.Linear(self.mlp.out_dim, 1, device=device)
                                    for t in tasks})

    @property
    def needs_batch(self) -> bool:
        return self.encoder.needs_batch

    def forward(self, pooled: KeyedTensor | None, jagged: dict[str, JaggedTensor] | None, dense: torch.Tensor,
                side: dict[str, torch.Tensor], batch: Batch | None = None) -> dict[str, torch.Tensor]:
        enc = self.encoder(pooled, jagged, dense, batch)
        h = self.mlp(enc.h)
        out = {task: head(h).squeeze(-1) for task, head in self.heads.items()}
        if enc.aux is not None:
            out[AUX_LOSS] = enc.aux
        return out
