"""The mini-batch L2's per-id occurrence count: the same numbers whichever way it is counted.

Small tables count with a bincount over the table's rows; large ones sort the batch's ids, so a step's
cost does not grow with the table (issue: cost that stays flat as tables grow)."""

from __future__ import annotations

import torch

from trec_rank.models.regularizer import DENSE_COUNT_ROWS_PER_ID, occurrences_per_id


def test_both_counting_routes_give_each_occurrence_its_ids_kept_count() -> None:
    ids = torch.tensor([5, 3, 5, 9, 5, 3, 0])
    keep = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # the third occurrence is padding
    expected = torch.tensor([2.0, 2.0, 2.0, 1.0, 2.0, 2.0, 1.0])  # id 5: kept twice; id 3: twice
    small = occurrences_per_id(ids, keep, 10)  # 10 rows <= 64 x 7 occurrences: bincount
    large = occurrences_per_id(ids, keep, DENSE_COUNT_ROWS_PER_ID * ids.numel() + 1)  # sort of the batch ids
    assert torch.equal(small, expected) and torch.equal(large, expected)


def test_large_table_route_matches_bincount_on_random_batches() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, 50, (200,), generator=gen)
        keep = (torch.rand(200, generator=gen) > 0.2).float()
        reference = torch.bincount(ids, weights=keep, minlength=50)[ids]
        assert torch.equal(occurrences_per_id(ids, keep, 10**7), reference)
