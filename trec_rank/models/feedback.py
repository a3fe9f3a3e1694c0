"""Explicit positive/negative feedback as a contrastive auxiliary task on the user representation.

Clicks say what a user looked at, ratings say what they liked: the positive history p (items rated
>= 4) and the negative history n (rated <= 2) are two views the ranking loss alone uses only
weakly. A user vector u = MLP(user features[, pooled full history]) is pulled towards the positives
and pushed away from the negatives:

    pooling "mean":  aux = weight * ( mean_{rows with p} -log sigmoid( s(u, mean_j p_j) / tau)
                                    + mean_{rows with n} -log sigmoid(-s(u, mean_j n_j) / tau) )
    pooling "items": the same with the pooled similarity replaced by the row's mean over its items,
                     mean_j -log sigmoid(s(u, p_j) / tau) (and likewise for n): every rated item is
                     one comparison, so a mixed history is not averaged into one blurred vector.

with s = cosine or dot similarity. Rows with an empty p (or n) contribute no term for it. The
target item's similarity s(u, target) then enters the ranking head as one extra feature: the
candidate only needs to be close to u to look like the positives.

`table_grad_scale` scales the aux gradient that reaches the looked-up embeddings (the shared item
and user tables; 0 keeps it off them, 1 is the plain sum of losses); the user tower always gets the
full aux gradient, and the ranking loss's gradient through s(u, target) is never scaled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from trec_rank.config.encoder import FeedbackParams
from trec_rank.models.embeddings import pool, segment_ids
from trec_rank.models.layers import MLP


def similarity(u: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """Row-wise s(u, x): [B, D] x [B, D] -> [B]; cosine of a zero vector is 0."""
    if kind == "cosine":
        return F.cosine_similarity(u, x, dim=-1, eps=1e-8)
    return (u * x).sum(dim=-1)


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x in the forward pass, scale * dL/dx in the backward pass."""
    if scale == 1.0:
        return x
    return x * scale + x.detach() * (1.0 - scale)


def feedback_loss(s_pos: torch.Tensor, has_pos: torch.Tensor, s_neg: torch.Tensor, has_neg: torch.Tensor,
                  tau: float) -> torch.Tensor:
    """mean over rows with p of -log sigmoid(s_pos / tau) + the same over rows with n of
    -log sigmoid(-s_neg / tau); masks [B] float (0 = no term). Masked, never branched: every
    parameter stays in the graph each step (DDP static graph)."""
    pos = (-F.logsigmoid(s_pos / tau) * has_pos).sum() / has_pos.sum().clamp(min=1.0)
    neg = (-F.logsigmoid(-s_neg / tau) * has_neg).sum() / has_neg.sum().clamp(min=1.0)
    return pos + neg


def item_feedback_term(u: torch.Tensor, items: torch.Tensor, lengths: torch.Tensor, live: torch.Tensor,
                       sign: float, kind: str, tau: float) -> torch.Tensor:
    """mean over live rows with items of (mean over the row's items j of -log sigmoid(sign s(u, x_j)/tau)).

    u [B, D]; items [N, D] jagged with lengths [B]; live [B] float (0 = padding row)."""
    rows = segment_ids(lengths, items.shape[0])
    per_item = -F.logsigmoid(sign * similarity(u[rows], items, kind) / tau)  # [N]
    weight = (live / lengths.clamp(min=1).to(u.dtype))[rows]  # each row's items sum to its live flag
    has = (lengths > 0).to(u.dtype) * live
    return (per_item * weight).sum() / has.sum().clamp(min=1.0)


class ExplicitFeedback(nn.Module):
    """user_in [B, user_dim] (user features [+ pooled history]) -> u [B, D] in the item space."""

    def __init__(self, user_dim: int, item_dim: int, params: FeedbackParams,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.params = params
        self.mlp = MLP(user_dim, params.hidden, device=device)
        self.proj = nn.Linear(self.mlp.out_dim, item_dim, device=device)

    def user_vector(self, user_in: torch.Tensor) -> torch.Tensor:
        return self.proj(self.mlp(user_in))

    def forward(self, user_in: torch.Tensor, target: torch.Tensor, pos: JaggedTensor, neg: JaggedTensor,
                row_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(s(u, target) [B, 1] for the ranking head, weighted aux loss or None outside training).

        pos/neg: the jagged positive/negative sequences ([N, D] values, lengths [B]); row_weights [B]
        (0 = padding)."""
        p = self.params
        u = self.user_vector(user_in)
        feature = similarity(u, target, p.similarity).unsqueeze(1)
        if not self.training:
            return feature, None
        g = p.table_grad_scale
        u_aux = u if g == 1.0 else self.user_vector(scale_grad(user_in, g))
        live = u.new_ones(u.shape[0]) if row_weights is None else (row_weights > 0).to(u.dtype)
        if p.pooling == "items":
            aux = (item_feedback_term(u_aux, scale_grad(pos.values(), g), pos.lengths(), live, 1.0,
                                      p.similarity, p.tau)
                   + item_feedback_term(u_aux, scale_grad(neg.values(), g), neg.lengths(), live, -1.0,
                                        p.similarity, p.tau))
        else:
            s_pos = similarity(u_aux, scale_grad(pool(pos, "mean"), g), p.similarity)
            s_neg = similarity(u_aux, scale_grad(pool(neg, "mean"), g), p.similarity)
            aux = feedback_loss(s_pos, (pos.lengths() > 0).to(u.dtype) * live,
                                s_neg, (neg.lengths() > 0).to(u.dtype) * live, p.tau)
        return feature, p.weight * aux
