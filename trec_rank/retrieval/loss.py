"""Sampled softmax over L2-normalised embeddings with temperature (the reference's SampledSoftmaxLoss).

For position p with user embedding q_p, positive item e_p and negatives n_{p,1..R} (all unit norm):
    loss_p = -log softmax([q.e_p, q.n_{p,1}, ..., q.n_{p,R}] / T)[0]
with a negative that equals the positive (an accidental hit) removed from the softmax, and the
batch loss the weighted mean over positions. No logQ correction, as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def negative_scores(user: torch.Tensor, cand: torch.Tensor, neg_index: torch.Tensor) -> torch.Tensor:
    """q_p . cand[neg_index[p, r]]: user [P, D], cand [U, D], neg_index [P, R] -> [P, R].

    Two exact ways, picked by memory: scoring every candidate (a [P, U] matmul, then a gather) is
    a GEMM and wins while U <= R*D (always on MovieLens: U <= #items); gathering [P, R, D]
    negative embeddings wins for huge corpora where U approaches P*R.
    """
    p, r = neg_index.shape
    if cand.shape[0] <= r * cand.shape[1]:
        return (user @ cand.T).gather(1, neg_index)
    return torch.einsum("pd,prd->pr", user, cand[neg_index.reshape(-1)].reshape(p, r, -1))


def sampled_softmax_loss(user: torch.Tensor, pos: torch.Tensor, cand: torch.Tensor, neg_index: torch.Tensor,
                         hit: torch.Tensor, weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """user, pos [P, D] and cand [U, D] unit-norm; neg_index, hit [P, R]; weights [P] -> scalar."""
    pos_logit = (user * pos).sum(-1, keepdim=True)
    neg_logit = negative_scores(user, cand, neg_index).masked_fill(hit, float("-inf"))
    nll = -F.log_softmax(torch.cat([pos_logit, neg_logit], dim=1) / temperature, dim=1)[:, 0]
    return (nll * weights).sum() / weights.sum().clamp(min=1.0)
