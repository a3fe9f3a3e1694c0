"""HSTU for ranking: a target-aware HSTU encoder module and the ranking over-arch built on it.

The encoder itself (layers, relative bias, jagged layout) lives in `hstu_encoder.py` and is
re-exported here, so `trec_rank.models.hstu` stays the one import for everything HSTU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from trec_rank.config.encoder import HSTUConfig, HSTUTokenParams
from trec_rank.config.models import HSTUParams
from trec_rank.config.schema import Schema
from trec_rank.config.typed import ConfigError
from trec_rank.data.batch import Batch
from trec_rank.models.embeddings import pool, pooled_dim
from trec_rank.models.hstu_encoder import (
    HSTUEncoder,
    HSTULayer,
    RelativeBias,
    SequenceInput,
    jagged_positions,
    pointwise_attention,
)
from trec_rank.models.hstu_jagged import pad_ints, time_buckets
from trec_rank.models.layers import MLP

__all__ = ["HSTUConfig", "HSTUEncoder", "HSTULayer", "HSTUOverArch", "HSTUParams", "HSTUTargetEncoder",
           "HSTUTokenParams", "RelativeBias", "SequenceInput", "action_tokens", "jagged_positions", "pad_ints",
           "pointwise_attention", "time_buckets"]


def action_tokens(items: torch.Tensor, table: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """History tokens that carry what the user did: item embedding + the embedding of the action on it.

    items [N, D] jagged, table [A, D], actions [N] in [0, A) -> [N, D]. The range is the loader's to check,
    once per chunk (ranking: `config.models.side_bounds`; retrieval: `retrieval/data.py`), not a
    per-step device reduction and host read here.
    The one token construction of every action-aware encoder (the ranking HSTU here, retrieval's
    HSTU and SASRec in retrieval/model.py): adding rather than interleaving item and action tokens
    keeps sequence length, positions and attention cost those of the plain model, and a zero table
    gives the plain model's tokens exactly (docs/compare.md).
    """
    return items + table[actions.long()]


class HSTUTargetEncoder(nn.Module):
    """Target-aware HSTU: (jagged EC outputs, side columns) -> [B, D] encoder outputs at the target tokens.

    Each row becomes [history..., target]: history token = item embedding + action embedding (the
    row's `action_side` value), target token = the target item embedding + action 0 (unknown).
    With one target token at the end, the causal mask is exactly target-aware attention: history
    tokens never see the target, the target sees the whole history. The target's timestamp is not
    an input of the ranking schema, so the target token uses the newest history timestamp (the
    closest known lower bound of the request time); history token i queries with ts[i+1].
    Reusable by any ranking model that reads the same EmbeddingCollection outputs (`from_schema`).
    """

    def __init__(self, params: HSTUTokenParams, dim: int, history_max_len: int, device: torch.device,
                 key: str = "model.params") -> None:
        super().__init__()
        if params.num_actions < 1:
            raise ConfigError(f"{key}.num_actions: must be >= 1, got {params.num_actions}")
        self.p = params
        self.action = nn.Parameter(torch.empty(params.num_actions, dim, device=device))
        self.encoder = HSTUEncoder(dim, history_max_len + 1, params.encoder, device)
        self.reset_parameters()

    @classmethod
    def from_schema(cls, schema, params: HSTUTokenParams, device: torch.device,  # noqa: ANN001 - FeatureSchema
                    key: str = "model.params") -> HSTUTargetEncoder:
        """Checks `params` against the schema (errors name `key` and the features), then builds on `device`."""
        hist, target = schema.feature(params.history), schema.feature(params.target)
        if hist.kind != "sequence" or target.kind != "sparse" or target.table != hist.table:
            raise ConfigError(f"{key}: history '{hist.name}' must be a sequence feature and target "
                              f"'{target.name}' a sparse feature on the same table ('{hist.table}')")
        for side in (params.action_side, params.time_side):
            if side and side not in hist.side:
                raise ConfigError(f"{key}: '{side}' is not a side column of '{hist.name}' "
                                  f"({sorted(hist.side)})")
        return cls(params, schema.table(hist.table).embedding_dim, hist.max_len, device, key)

    def reset_parameters(self) -> None:
        if not self.action.is_meta:
            nn.init.normal_(self.action, std=0.02)

    def tokens(self, jagged: dict[str, JaggedTensor], side: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """[history..., target] rows: tokens [N+B, D], lengths [B], ts/query_ts [N+B], target index [B]."""
        hist, target = jagged[self.p.history], jagged[self.p.target].values()  # [N, D], [B, D]
        h, lengths = hist.values(), hist.lengths().long()
        key = f"{self.p.history}/"
        if self.p.action_side:
            h = action_tokens(h, self.action, side[key + self.p.action_side])
        no_time = h.new_zeros(h.shape[0], dtype=torch.long)
        ts = side[key + self.p.time_side].long() if self.p.time_side else no_time
        b = lengths.numel()
        rows = torch.repeat_interleave(torch.arange(b, device=h.device), lengths, output_size=h.shape[0])
        hist_idx = torch.arange(h.shape[0], device=h.device) + rows  # each earlier row adds one target slot
        tgt = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths + 1)[1:] - 1
        last_ts = torch.where(lengths > 0, F.pad(ts, (1, 0))[tgt - torch.arange(b, device=h.device)], 0)
        tokens = h.new_zeros(h.shape[0] + b, h.shape[1]).index_put((hist_idx,), h)
        tokens = tokens.index_put((tgt,), target + self.action[0])
        all_ts = ts.new_zeros(tokens.shape[0]).index_put((hist_idx,), ts).index_put((tgt,), last_ts)
        # a history token queries at the next token's time; the target at its own
        query = torch.cat([all_ts[1:], all_ts[-1:]]).index_put((tgt,), last_ts)
        return tokens, lengths + 1, all_ts, query, tgt

    def forward(self, jagged: dict[str, JaggedTensor], side: dict[str, torch.Tensor],
                host_lengths: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """EC outputs (`history` jagged [N, D], `target` [B, D]) + side columns -> [B, D] at the targets.

        host_lengths: `Batch.host_lengths`; the history's CPU lengths spare the encoder a device read."""
        tokens, lengths, ts, query, tgt = self.tokens(jagged, side)
        host = (host_lengths or {}).get(self.p.history)
        return self.encoder(tokens, lengths, ts, query, None if host is None else host + 1)[tgt]


class HSTUOverArch(nn.Module):
    """Ranking over-arch: HSTUTargetEncoder output (+ pooled features, dense) -> MLP -> one head per task."""

    def __init__(self, schema: Schema, tasks: list[str], params: HSTUParams, device: torch.device) -> None:
        super().__init__()
        self.p = params
        self.target_encoder = HSTUTargetEncoder.from_schema(schema, params, device)
        dim = schema.table(schema.feature(params.history).table).embedding_dim
        self.others = [(f.name, f.pooling if f.kind == "sparse" else params.history_pooling)
                       for f in schema.sequence_features if f.name not in (params.history, params.target)]
        width = dim + pooled_dim(schema) + len(schema.dense)
        width += sum(schema.table(schema.feature(n).table).embedding_dim for n, _ in self.others)
        self.mlp = MLP(width, params.hidden, dropout=params.dropout, device=device)
        self.heads = nn.ModuleDict({t: nn.Linear(self.mlp.out_dim, 1, device=device)
                                    for t in tasks})

    needs_batch = True  # for Batch.host_lengths (models/ranking.py)

    def forward(self, pooled: KeyedTensor | None, jagged: dict[str, JaggedTensor] | None,
                dense: torch.Tensor, side: dict[str, torch.Tensor], batch: Batch | None = None
                ) -> dict[str, torch.Tensor]:
        assert jagged is not None, "the HSTU over-arch needs the EmbeddingCollection outputs"
        host = batch.host_lengths if batch is not None else None
        encoded = self.target_encoder(jagged, side, host)  # [B, D] at the target tokens
        parts = [encoded] + ([] if pooled is None else [pooled.values()])
        parts += [pool(jagged[name], mode) for name, mode in self.others]
        h = self.mlp(torch.cat([*parts, dense], dim=1))
        return {task: head(h).squeeze(-1) for task, head in self.heads.items()}
