"""DIN's local activation unit: target attention over a jagged behaviour sequence (KDD 2018, eq. 3).

v_U(A) = sum_j a(e_j, v_A) * e_j, where a() is an MLP over an interaction of the query (the target
item) and each key (one behaviour). The weights are deliberately NOT normalised: the paper relaxes
sum_j w_j = 1 so that the pooled vector keeps the intensity of the user's interest (a user with many
relevant behaviours gets a larger vector). Softmax is available as an option for comparison.

The unit runs on the jagged values only ([N] behaviours, not [B, L] padded slots): padding never
reaches the MLP, never shifts Dice's batch statistics and gets exactly zero weight.
"""

from __future__ import annotations

import torch
from torch import nn

from trec_rank.config.encoder import AttentionParams, Interaction
from trec_rank.models.dice import make_activation
from trec_rank.models.embeddings import segment_ids
from trec_rank.models.layers import MLP


def term_dim(params: AttentionParams, term: Interaction, dim: int) -> int:
    """Width of one interaction term for query/key width `dim`."""
    if term != "outer":
        return dim
    return params.outer_dim if params.outer_dim > 0 else dim * dim


def interaction_dim(params: AttentionParams, dim: int) -> int:
    """Width of the activation unit's input for query/key width `dim`."""
    return sum(term_dim(params, term, dim) for term in params.interaction)


def segment_softmax(scores: torch.Tensor, segments: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Softmax of jagged scores [N] within each row (segments [N] = row of each score)."""
    neg_inf = torch.full((num_segments,), float("-inf"), dtype=scores.dtype, device=scores.device)
    row_max = neg_inf.scatter_reduce(0, segments, scores.detach(), reduce="amax", include_self=True)
    e = torch.exp(scores - row_max[segments])
    denom = torch.zeros(num_segments, dtype=scores.dtype, device=scores.device).index_add(0, segments, e)
    return e / denom[segments]


class TargetAttention(nn.Module):
    """query [B, D] (target item, dense per row) x keys [N, D] (jagged behaviours) -> [B, D]."""

    def __init__(self, dim: int, params: AttentionParams, device: torch.device | None = None) -> None:
        super().__init__()
        self.dim, self.params = dim, params
        self.bilinear = None
        if "outer" in params.interaction and params.outer_dim > 0:
            self.bilinear = nn.Bilinear(dim, dim, params.outer_dim, bias=False, device=device)
        self.mlp = MLP(interaction_dim(params, dim), params.hidden, device=device,
                       act=make_activation(params.activation, device))
        self.score = nn.Linear(self.mlp.out_dim, 1, device=device)

    def interaction(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Per-behaviour unit input: q, k [N, D] -> [N, interaction_dim]."""
        terms = []
        for term in self.params.interaction:
            if term == "query":
                terms.append(q)
            elif term == "key":
                terms.append(k)
            elif term == "diff":
                terms.append(q - k)
            elif term == "prod":
                terms.append(q * k)
            elif self.bilinear is not None:
                terms.append(self.bilinear(q, k))
            else:
                terms.append((q.unsqueeze(2) * k.unsqueeze(1)).flatten(1))
        return torch.cat(terms, dim=1)

    def _first_layer(self, first: nn.Linear, query: torch.Tensor, keys: torch.Tensor,
                     segments: torch.Tensor) -> torch.Tensor:
        """first(interaction(query[segments], keys)) -> [N, out], computed factorised.

        The layer is linear in its input, so W [q; k; q - k; q * k] + b =
        (W_q + W_d) q + b  +  (W_k - W_d) k  +  W_p (q * k): the query-only part is computed once per
        row [B] and gathered, not once per behaviour [N], and the [N, 4D] concatenation is never built.
        Same parameters (the Linear's weight, sliced by term), same function up to float rounding;
        tests/test_speed_equivalence.py compares it with the concatenated form."""
        w, d = first.weight, self.dim
        per_row = w.new_zeros(w.shape[0], d)  # [H, D], applied to the query once per row
        per_key = w.new_zeros(w.shape[0], d)  # [H, D], applied to every behaviour's key
        q_seg = query.index_select(0, segments) if {"prod", "outer"} & set(self.params.interaction) else None
        extra = []  # (per-behaviour input [N, *], its weight slice [H, *])
        offset = 0
        for term in self.params.interaction:
            part = w[:, offset:offset + term_dim(self.params, term, d)]
            offset += part.shape[1]
            if term == "query":
                per_row = per_row + part
            elif term == "key":
                per_key = per_key + part
            elif term == "diff":
                per_row, per_key = per_row + part, per_key - part
            else:  # prod or outer: per-behaviour terms, q_seg was gathered above
                assert q_seg is not None
                if term == "prod":
                    extra.append((q_seg * keys, part))
                elif self.bilinear is not None:
                    extra.append((self.bilinear(q_seg, keys), part))
                else:
                    extra.append(((q_seg.unsqueeze(2) * keys.unsqueeze(1)).flatten(1), part))
        h = torch.addmm(first.bias, query, per_row.t()).index_select(0, segments).addmm_(keys, per_key.t())
        for x, part in extra:
            h = h.addmm_(x, part.t())
        return h

    def _scores(self, query: torch.Tensor, keys: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """Unnormalised scores [N]: the MLP (its first Linear factorised) and the score layer."""
        if not self.params.hidden:  # no hidden layer: the score layer is the one over the interaction
            return self._first_layer(self.score, query, keys, segments).squeeze(-1)
        layers = list(self.mlp.net)
        first = layers[0]
        assert isinstance(first, nn.Linear)  # MLP layers start with a Linear
        h = self._first_layer(first, query, keys, segments)
        for layer in layers[1:]:
            h = layer(h)
        return self.score(h).squeeze(-1)

    def weights(self, query: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """Jagged attention weights [N] aligned with `keys` (lengths [B] cut them into rows)."""
        segments = segment_ids(lengths, keys.shape[0]) if segments is None else segments
        scores = self._scores(query, keys, segments)
        if self.params.attention_norm == "softmax":
            return segment_softmax(scores, segments, lengths.numel())
        return scores

    def forward(self, query: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """sum_j w_j k_j per row; rows without behaviours get zeros."""
        segments = segment_ids(lengths, keys.shape[0])
        w = self.weights(query, keys, lengths, segments)
        out = torch.zeros(lengths.numel(), keys.shape[1], dtype=keys.dtype, device=keys.device)
        return out.index_add(0, segments, w.unsqueeze(1) * keys)
