"""Explicit positive/negative feedback as a contrastive auxiliary task on the user representation.

Clicks say what a user looked at, ratings say what they liked: the positive history p (items rated
>= 4) and the negative history n (rated <= 2) are two views the ranking loss alone uses only
weakly. A user vector u = MLP(user features, pooled full history) is pulled towards the pooled
positives and pushed away from the pooled negatives:

    aux = weight * ( mean_{rows with p} -log sigmoid(s(u, p) / tau)
                   + mean_{rows with n} -log sigmoid(-s(u, n) / tau) )

with s = cosine or dot similarity. Rows with an empty p (or n) contribute no term for it. The
target item's similarity s(u, target) then enters the ranking head as one extra feature, so the
ranking task reads the preference direction the auxiliary task shaped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from trec_rank.config.typed import ConfigError
from trec_rank.models.layers import MLP


@dataclass
class FeedbackParams:
    """Switch `enabled` off for the ablation. Feature names refer to the schema: `user` features
    (any sparse ones), `history` (all behaviours), `positive`/`negative` sequences and the `target`
    item, which must share the positive/negative table's embedding width."""

    enabled: bool = False
    user: list[str] = field(default_factory=list)
    history: str = ""
    positive: str = ""
    negative: str = ""
    target: str = ""
    hidden: list[int] = field(default_factory=lambda: [64])
    similarity: Literal["cosine", "dot"] = "cosine"
    tau: float = 0.5
    weight: float = 0.1

    def post_load(self, key: str) -> None:
        if not self.enabled:
            return
        for name in ("history", "positive", "negative", "target"):
            if not getattr(self, name):
                raise ConfigError(f"{key}.{name}: required when feedback is enabled")
        if self.tau <= 0:
            raise ConfigError(f"{key}.tau: must be > 0, got {self.tau}")
        if self.weight < 0:
            raise ConfigError(f"{key}.weight: must be >= 0, got {self.weight}")


def similarity(u: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """Row-wise s(u, x): [B, D] x [B, D] -> [B]; cosine of a zero vector is 0."""
    if kind == "cosine":
        return F.cosine_similarity(u, x, dim=-1, eps=1e-8)
    return (u * x).sum(dim=-1)


def feedback_loss(s_pos: torch.Tensor, has_pos: torch.Tensor, s_neg: torch.Tensor, has_neg: torch.Tensor,
                  tau: float) -> torch.Tensor:
    """mean over rows with p of -log sigmoid(s_pos / tau) + the same over rows with n of
    -log sigmoid(-s_neg / tau); masks [B] float (0 = no term). Masked, never branched: every
    parameter stays in the graph each step (DDP static graph)."""
    pos = (-F.logsigmoid(s_pos / tau) * has_pos).sum() / has_pos.sum().clamp(min=1.0)
    neg = (-F.logsigmoid(-s_neg / tau) * has_neg).sum() / has_neg.sum().clamp(min=1.0)
    return pos + neg


class ExplicitFeedback(nn.Module):
    """user_in [B, user_dim] (user features + pooled history) -> u [B, D] in the item space."""

    def __init__(self, user_dim: int, item_dim: int, params: FeedbackParams,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.params = params
        self.mlp = MLP(user_dim, params.hidden, device=device)
        self.proj = nn.Linear(self.mlp.out_dim, item_dim, device=device)

    def user_vector(self, user_in: torch.Tensor) -> torch.Tensor:
        return self.proj(self.mlp(user_in))

    def forward(self, user_in: torch.Tensor, target: torch.Tensor, pos: torch.Tensor,
                pos_lengths: torch.Tensor, neg: torch.Tensor, neg_lengths: torch.Tensor,
                row_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(s(u, target) [B, 1] for the ranking head, weighted aux loss or None outside training).

        pos/neg: pooled [B, D] (zeros for empty rows); *_lengths [B]; row_weights [B] (0 = padding)."""
        u = self.user_vector(user_in)
        feature = similarity(u, target, self.params.similarity).unsqueeze(1)
        if not self.training:
            return feature, None
        live = 1.0 if row_weights is None else (row_weights > 0).to(u.dtype)
        kind = self.params.similarity
        aux = feedback_loss(similarity(u, pos, kind), (pos_lengths > 0).to(u.dtype) * live,
                            similarity(u, neg, kind), (neg_lengths > 0).to(u.dtype) * live, self.params.tau)
        return feature, self.params.weight * aux
