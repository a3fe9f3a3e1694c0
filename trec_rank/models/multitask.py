"""Multi-task over-arch: feature encoder -> tower network (towers.py) -> per-task tower MLP -> logit.

The encoder is the same one DIN uses, so `encoder.attention` turns any tower model into a
DIN-encoded multi-task model; per-task loss weights come from `train.loss_weights`.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from trec_rank.config.models import TowerParams
from trec_rank.config.schema import Schema
from trec_rank.data.batch import Batch
from trec_rank.models.dice import make_activation
from trec_rank.models.encoder import FeatureEncoder
from trec_rank.models.layers import MLP
from trec_rank.models.ranking import AUX_LOSS
from trec_rank.models.towers import Gates, build_network


class MultiTaskOverArch(nn.Module):
    """(pooled, jagged, dense, side[, batch]) -> {task: logit [B]} (+ AUX_LOSS in training)."""

    def __init__(self, schema: Schema, tasks: list[str], params: TowerParams, device: torch.device,
                 kind: str) -> None:
        super().__init__()
        act = make_activation(params.activation, device)
        self.encoder = FeatureEncoder(schema, params.encoder, device)
        self.net = build_network(kind, self.encoder.out_dim, tasks, params, act, device)
        towers = {t: MLP(self.net.out_dim, params.tower_hidden, params.dropout, device, act) for t in tasks}
        self.towers = nn.ModuleDict(towers)
        self.heads = nn.ModuleDict({t: nn.Linear(towers[t].out_dim, 1, device=device) for t in tasks})

    @property
    def needs_batch(self) -> bool:
        return self.encoder.needs_batch

    def forward_gates(self, pooled: KeyedTensor | None, jagged: dict[str, JaggedTensor] | None,
                      dense: torch.Tensor, batch: Batch | None = None
                      ) -> tuple[dict[str, torch.Tensor], Gates]:
        enc = self.encoder(pooled, jagged, dense, batch)
        per_task, gates = self.net.forward_gates(enc.h)
        out = {t: self.heads[t](self.towers[t](per_task[t])).squeeze(-1) for t in self.heads}
        if enc.aux is not None:
            out[AUX_LOSS] = enc.aux
        return out, gates

    def forward(self, pooled: KeyedTensor | None, jagged: dict[str, JaggedTensor] | None, dense: torch.Tensor,
                side: dict[str, torch.Tensor], batch: Batch | None = None) -> dict[str, torch.Tensor]:
        return self.forward_gates(pooled, jagged, dense, batch)[0]

