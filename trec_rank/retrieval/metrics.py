"""Full-corpus ranking metrics for one held-out target per user: HR@k, NDCG@k, MRR.

With a single relevant item at rank r (1 = best): HR@k = [r <= k], NDCG@k = [r <= k] / log2(r + 1)
(the ideal DCG is 1), MRR = 1 / r; each averaged over users. Ranks are exact over the whole corpus
(the reference caps them at its top-2500 retrieval; only MRR can differ, for targets ranked past
2500). Ties count against the target (an untrained model with equal scores gets the worst rank,
not the best), and items already in the user's history window are removed before ranking, as in
the reference.
"""

from __future__ import annotations

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


class RankingMetrics:
    """Weighted sums of HR@k, NDCG@k and 1/rank; compute() all-reduces them when a process group exists."""

    def __init__(self, ks: list[int], device: torch.device) -> None:
        self.ks = sorted(set(ks))
        self.sums = torch.zeros(2 * len(self.ks) + 2, dtype=torch.float64, device=device)

    def update(self, ranks: torch.Tensor, weights: torch.Tensor) -> None:
        """ranks [B] (1 = best), weights [B] (0 = padding row)."""
        r, w = ranks.double(), weights.double()
        hits = [(r <= k).double() for k in self.ks]
        ndcg = [h / torch.log2(r + 1) for h in hits]
        cols = torch.stack([*hits, *ndcg, 1.0 / r, torch.ones_like(r)], dim=1)
        self.sums += (cols * w.unsqueeze(1)).sum(0)

    def compute(self) -> dict[str, float]:
        sums = self.sums.clone()
        if dist.is_initialized():
            dist.all_reduce(sums)
        n = float(sums[-1])
        values = (sums / max(n, 1.0)).tolist()
        names = [f"hr@{k}" for k in self.ks] + [f"ndcg@{k}" for k in self.ks] + ["mrr"]
        return {**dict(zip(names, values)), "users": n}
