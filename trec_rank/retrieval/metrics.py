"""Full-corpus ranking metrics for one held-out target per user: HR@k, NDCG@k, MRR.

With a single relevant item at rank r (1 = best): HR@k = [r <= k], NDCG@k = [r <= k] / log2(r + 1)
(the ideal DCG is 1), MRR = 1 / r; each averaged over users. Ranks are exact over the whole corpus
(the reference caps them at its top-2500 retrieval; only MRR can differ, for targets ranked past
2500). Ties count against the target (an untrained model with equal scores gets the worst rank,
not the best), and items already in the user's history window are removed before ranking, as in
the reference.

Besides the sums, `RankingMetrics` keeps every user's (user, target, rank): the per-user values
that `trec-rank compare` pairs across runs (metrics.json alone cannot say whether a difference
between two runs is more than the noise of one test set).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def target_ranks(scores: torch.Tensor, target: torch.Tensor, seen_rows: torch.Tensor,
                 seen_cols: torch.Tensor) -> torch.Tensor:
    """Rank of each row's target among all columns, seen items excluded.

    scores [B, C] (one column per corpus item), target [B] column of the target, seen_rows/seen_cols
    [S] (row, column) pairs of history items -> ranks [B] int64 in [1, C].
    """
    scores = scores.index_put((seen_rows, seen_cols), scores.new_tensor(float("-inf")))
    target_score = scores.gather(1, target.unsqueeze(1))
    return (scores >= target_score).sum(1)


def rank_metrics(ranks: torch.Tensor, ks: list[int]) -> dict[str, torch.Tensor]:
    """Per-user metric values of ranks [B] (1 = best): {"hr@k", "ndcg@k" for k in ks, "mrr"} -> [B] float64.

    The one definition both the averages (metrics.json) and the per-user rows use."""
    r = ranks.double()
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        out[f"hr@{k}"] = (r <= k).double()
    for k in ks:
        out[f"ndcg@{k}"] = out[f"hr@{k}"] / torch.log2(r + 1)
    out["mrr"] = 1.0 / r
    return out


class RankingMetrics:
    """Weighted sums of HR@k, NDCG@k and 1/rank; compute() all-reduces them when a process group exists.

    When `update` gets the users and targets, `per_user()` returns each user's rank (all ranks' users)."""

    def __init__(self, ks: list[int], device: torch.device) -> None:
        self.ks = sorted(set(ks))
        self.sums = torch.zeros(2 * len(self.ks) + 2, dtype=torch.float64, device=device)
        self.rows: list[np.ndarray] = []  # [3, B'] (user, target, rank) of the rows with weight > 0

    def update(self, ranks: torch.Tensor, weights: torch.Tensor, users: torch.Tensor | None = None,
               targets: torch.Tensor | None = None) -> None:
        """ranks [B] (1 = best), weights [B] (0 = padding row); users, targets [B] (optional) int64."""
        w = weights.double()
        cols = torch.stack([*rank_metrics(ranks, self.ks).values(), torch.ones_like(w)], dim=1)
        self.sums += (cols * w.unsqueeze(1)).sum(0)
        if users is not None and targets is not None:
            keep = weights > 0
            self.rows.append(torch.stack([users[keep], targets[keep], ranks[keep]]).long().cpu().numpy())

    def compute(self) -> dict[str, float]:
        sums = self.sums.clone()
        if dist.is_initialized():
            dist.all_reduce(sums)
        n = float(sums[-1])
        values = (sums / max(n, 1.0)).tolist()
        names = [f"hr@{k}" for k in self.ks] + [f"ndcg@{k}" for k in self.ks] + ["mrr"]
        return {**dict(zip(names, values)), "users": n}

    def per_user(self) -> dict[str, np.ndarray]:
        """{"user", "target", "rank", <metric>...} over every rank's users, sorted by user (collective)."""
        local = np.concatenate(self.rows, axis=1) if self.rows else np.zeros((3, 0), dtype=np.int64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local)
            local = np.concatenate(parts, axis=1)
        user, target, rank = local[:, np.argsort(local[0], kind="stable")]
        metrics = rank_metrics(torch.from_numpy(rank), self.ks)
        return {"user": user, "target": target, "rank": rank, **{k: v.numpy() for k, v in metrics.items()}}
