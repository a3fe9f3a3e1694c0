"""The HSTU encoder (Zhai et al. 2024, "Actions Speak Louder than Words") on jagged sequences.

One layer, as in the reference research code (docs/hstu.md has the equations and the protocol):
    u, v, q, k = split(SiLU(LayerNorm(x) W_uvqk))
    A = SiLU(q k^T + rab_{p,t}) / N * causal        (pointwise aggregated attention, no softmax)
    y = x + W_o Dropout(u * LayerNorm(A v))
N is the configured maximum length, not the batch's: attention weights do not depend on how the
batch was padded. Token-wise work (LayerNorms, projections, gating) runs on the jagged values
[sum(lengths), D]; only q, k, v go to padded [n, L, ...] for the L x L attention, and A v comes
straight back to jagged, via fbgemm's jagged ops. The rows are padded per length group (n rows of
similar length, L = the group's longest row; see hstu_jagged.py), not to the batch's longest row.

Sequences are described by `lengths` [B] and jagged `timestamps` / `query_ts` [N] aligned with the
values: the relative time bias of query i and key j buckets `query_ts[i] - timestamps[j]`, where
the reference uses the *next* event's timestamp as the query time (the request time is known at
retrieval time, generative-recommenders#348).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trec_rank.config.encoder import HSTUConfig
from trec_rank.models.hstu_jagged import Group, JaggedLayout, plan, table_gather


def jagged_positions(offsets: torch.Tensor, total: int) -> torch.Tensor:
    """Position of every jagged value inside its row (0 = oldest): offsets [B+1] -> [total]."""
    return torch.ops.fbgemm.offsets_range(offsets, total)


class SequenceInput(nn.Module):
    """item embedding * sqrt(D) + learned absolute position embedding, then dropout (jagged in and out).

    Shared by HSTU and SASRec (the reference preprocessor of both). Position 0 is each row's oldest item.
    """

    def __init__(self, dim: int, max_len: int, dropout: float, device: torch.device | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.empty(max_len, dim, device=device))
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            nn.init.trunc_normal_(self.weight, std=math.sqrt(1.0 / self.dim))

    def forward(self, emb: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """emb [N, D] jagged, positions [N] (each value's index in its row) -> [N, D] jagged."""
        return self.dropout(emb * math.sqrt(self.dim) + self.weight[positions])


class RelativeBias(nn.Module):
    """rab_{p,t}: a learned bias per relative position (j - i) plus one per log-bucketed time gap."""

    def __init__(self, max_len: int, num_buckets: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.max_len, self.num_buckets = max_len, num_buckets
        self.pos_w = nn.Parameter(torch.empty(2 * max_len - 1, device=device))  # index j - i + max_len - 1
        self.ts_w = nn.Parameter(torch.empty(num_buckets + 1, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.pos_w.is_meta:
            nn.init.normal_(self.pos_w, std=0.02)
            nn.init.normal_(self.ts_w, std=0.02)

    def forward(self, buckets: torch.Tensor, rel: torch.Tensor | None = None) -> torch.Tensor:
        """buckets [B, L, L] (query i, key j; from `time_buckets`), rel [L, L] (j - i + max_len - 1,
        built here when not given) -> bias [B, L, L]."""
        length = buckets.shape[-1]
        assert length <= self.max_len, f"sequence of {length} tokens exceeds max_len {self.max_len}"
        if rel is None:
            idx = torch.arange(length, device=buckets.device)
            rel = idx.unsqueeze(0) - idx.unsqueeze(1) + self.max_len - 1
        return table_gather(self.pos_w, rel) + table_gather(self.ts_w, buckets)


def pointwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rab: torch.Tensor,
                        causal: torch.Tensor, n: int) -> torch.Tensor:
    """sum_j SiLU(q_i.k_j + rab_ij) / n * v_j over causal j <= i: no softmax, so the output grows with
    the number (and strength) of matching keys instead of being a convex mix of values.

    q, k [B, L, H, dqk], v [B, L, H, dv], rab [B, L, L] (shared by heads), causal [L, L] -> [B, L, H, dv].
    """
    attn = F.silu(torch.einsum("bihd,bjhd->bhij", q, k) + rab.unsqueeze(1)) * causal  # [B, H, L, L]
    return torch.einsum("bhij,bjhd->bihd", attn, v) / n


class HSTULayer(nn.Module):
    """One HSTU block on jagged x [N, D] (see the module docstring for the equations)."""

    def __init__(self, dim: int, max_len: int, cfg: HSTUConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.heads, self.dqk, self.dv, self.max_len = cfg.num_heads, cfg.dqk, cfg.dv, max_len
        hv, hqk = cfg.num_heads * cfg.dv, cfg.num_heads * cfg.dqk
        self.uvqk = nn.Parameter(torch.empty(dim, 2 * hv + 2 * hqk, device=device))
        self.out_w = nn.Parameter(torch.empty(dim, hv, device=device))
        self.out_b = nn.Parameter(torch.empty(dim, device=device))
        self.rab = RelativeBias(max_len, cfg.num_time_buckets, device)
        self.dropout = nn.Dropout(cfg.linear_dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference init: W_uvqk ~ N(0, 0.02); output projection xavier, bias as nn.Linear's."""
        if self.uvqk.is_meta:
            return
        nn.init.normal_(self.uvqk, std=0.02)
        nn.init.xavier_uniform_(self.out_w)
        bound = 1.0 / math.sqrt(self.out_w.shape[1])
        nn.init.uniform_(self.out_b, -bound, bound)

    def _attend(self, vqk: torch.Tensor, g: Group) -> torch.Tensor:
        """One length group: jagged v|q|k [n_values, hv + 2 hqk] -> jagged A v [n_values, hv]."""
        h, hv = self.heads, self.heads * self.dv
        dense = torch.ops.fbgemm.jagged_to_padded_dense(vqk, [g.offsets], [g.length], 0.0)  # [n, L, .]
        v, q, k = dense.split([hv, h * self.dqk, h * self.dqk], dim=-1)
        shape = (dense.shape[0], g.length, h, -1)
        av = pointwise_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape),
                                 self.rab(g.buckets, g.rel), g.causal, self.max_len)
        return torch.ops.fbgemm.dense_to_jagged(av.reshape(dense.shape[0], g.length, hv), [g.offsets],
                                                total_L=vqk.shape[0])[0]

    def forward(self, x: torch.Tensor, layout: JaggedLayout) -> torch.Tensor:
        """x [N, D] jagged in `layout`'s (length-grouped) value order -> [N, D], same order."""
        hv = self.heads * self.dv
        uvqk = F.silu(F.layer_norm(x, x.shape[-1:], eps=1e-6) @ self.uvqk)
        u, vqk = uvqk.split([hv, uvqk.shape[1] - hv], dim=1)
        # one split (its backward is one cat), not a slice per group (a full-size zero gradient each)
        parts = vqk.split([g.end - g.start for g in layout.groups])
        av = torch.cat([self._attend(part, g) for part, g in zip(parts, layout.groups)])
        y = u * F.layer_norm(av, (hv,), eps=1e-6)
        return x + F.linear(self.dropout(y), self.out_w, self.out_b)


class HSTUEncoder(nn.Module):
    """Jagged item embeddings -> jagged HSTU outputs (not normalised: retrieval L2-normalises them).

    The batch's layout (length groups, time buckets, masks; see hstu_jagged.py) is planned once and
    shared by every layer; the values are permuted into it on the way in and back on the way out.
    """

    def __init__(self, dim: int, max_len: int, cfg: HSTUConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.num_buckets, self.max_len = cfg.num_time_buckets, max_len
        self.input = SequenceInput(dim, max_len, cfg.input_dropout, device)
        self.layers = nn.ModuleList(HSTULayer(dim, max_len, cfg, device) for _ in range(cfg.num_blocks))

    def forward(self, emb: torch.Tensor, lengths: torch.Tensor, timestamps: torch.Tensor,
                query_ts: torch.Tensor, host_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """emb [N, D], timestamps/query_ts [N] (jagged, aligned), lengths [B] -> [N, D] jagged.

        host_lengths: `lengths` on the CPU when the caller has them (no device read; see `plan`)."""
        if emb.shape[0] == 0:
            return emb
        layout = plan(lengths, timestamps, query_ts, self.max_len, self.num_buckets, host_lengths)
        x = self.input(emb[layout.perm], layout.positions)
        for layer in self.layers:
            x = layer(x, layout)
        return layout.scatter_back(x)
