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
from trec_rank.models.layers import StackedLinear, StackedMLP
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
        self.tasks = tasks
        # one tower MLP and one linear head per task, stacked (layers.StackedMLP): task i is member i
        self.towers = StackedMLP(len(tasks), self.net.out_dim, params.tower_hidden, params.dropout, device, act)
        self.heads = StackedLinear(len(tasks), self.towers.out_dim, 1, device)

    @property
    def needs_batch(self) -> bool:
        return self.encoder.needs_batch

    def forward_gates(self, pooled: KeyedTensor | None, jagged: dict[str, JaggedTensor] | None,
                      dense: torch.Tensor, batch: Batch | None = None
                      ) -> tuple[dict[str, torch.Tensor], Gates]:
        enc = self.encoder(pooled, jagged, dense, batch)
        per_task, gates = self.net.forward_gates(enc.h)
        h = torch.stack([per_task[t] for t in self.tasks])  # [T, B, H], in task order
        logits = self.heads(self.towers(h)).squeeze(-1)  # [T, B]
        out = dict(zip(self.tasks, logits.unbind(0), strict=True))
        if enc.aux is not None:
            out[AUX_LOSS] = enc.aux
        return out, gates

    def forward(self, pooled: KeyedTensor | None, jagged: dict[str, JaggedTensor] | None, dense: torch.Tensor,
                side: dict[str, torch.Tensor], batch: Batch | None = None) -> dict[str, torch.Tensor]:
        return self.forward_gates(pooled, jagged, dense, batch)[0]

