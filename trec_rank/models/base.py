"""The embedding + MLP base model: every feature pooled, concatenated, one shared MLP, per-task heads.

It is the floor every sequence model must beat: histories are mean/sum pooled, so order and the
target item do not interact with the history.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from trec_rank.config.models import BaseParams
from trec_rank.config.schema import Schema
from trec_rank.models.embeddings import pool, pooled_dim, pooled_values
from trec_rank.models.layers import MLP


class BaseOverArch(nn.Module):
    """[pooled sparse | pooled EC features | dense] -> MLP -> one logit per task."""

    def __init__(self, schema: Schema, tasks: list[str], params: BaseParams, device: torch.device) -> None:
        super().__init__()
        self.pooled_names = [f.name for f in schema.pooled_features]
        self.ec_features = [(f.name, f.pooling if f.kind == "sparse" else params.history_pooling)
                            for f in schema.sequence_features]
        width = pooled_dim(schema) + len(schema.dense)
        width += sum(schema.table(f.table).embedding_dim for f in schema.sequence_features)
        self.mlp = MLP(width, params.hidden, dropout=params.dropout, device=device)
        self.heads = nn.ModuleDict({t: nn.Linear(self.mlp.out_dim, 1, device=device) for t in tasks})

    def forward(self, pooled: KeyedTensor | None, jagged: dict[str, JaggedTensor] | None,
                dense: torch.Tensor, side: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        parts = [] if pooled is None else [pooled_values(pooled, self.pooled_names)]
        if jagged is not None:
            parts += [pool(jagged[name], mode) for name, mode in self.ec_features]
        parts.append(dense)
        h = self.mlp(torch.cat(parts, dim=1))
        return {task: head(h).squeeze(-1) for task, head in self.heads.items()}
