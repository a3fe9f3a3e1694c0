"""Per-batch jagged layout for HSTU attention: rows grouped by length, planned once and shared by all layers.

Padding every row to the batch's longest one makes the L x L attention cost B * L_max^2, while
the real work is sum(len_i^2); on ml-100k (lengths 17..200, mean ~80) that wastes most of it. So
the encoder sorts its rows by length, cuts them into groups of similar length (a new group starts
when a row is shorter than GROUP_RATIO times the group's longest row), and pads each group only to
its own longest row. Each row's result is unchanged: rows never attend to each other, padding
sits after each row's end (causal masking keeps it out of real positions), and the 1/N scale is
the configured max length, not a padded length.

Everything that depends only on the batch, not on a layer, is computed here once: the value
permutation that makes every group contiguous in the jagged values, each group's offsets and
length, its [n, L, L] time buckets and its [L, L] causal mask and relative-position index.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

GROUP_RATIO = 0.8  # a row shorter than this fraction of its group's longest row starts a new group
TIME_BUCKET_BASE = 0.301  # bucket = floor(ln|dt| / 0.301): the reference's log-bucketing of seconds


def time_buckets(dt: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Log buckets of time gaps (any shape, int seconds): clamp(floor(ln(max(|dt|, 1)) / 0.301), 0, n)."""
    return (dt.abs().clamp(min=1).float().log() / TIME_BUCKET_BASE).long().clamp(0, num_buckets)


def pad_ints(values: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
    """Jagged integer values [N] -> padded [B, max_len] with zeros after each row's end (no autograd)."""
    out = values.new_zeros(offsets.numel() - 1, max_len)
    rows = torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=values.device), offsets.diff(),
                                   output_size=values.numel())
    out[rows, torch.ops.fbgemm.offsets_range(offsets, values.numel())] = values
    return out


def _causal_and_rel(length: int, max_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A group padded to `length`: its [L, L] causal mask (1 where key j <= query i) and relative-position
    index j - i + max_len - 1."""
    i = torch.arange(length, device=device)
    return torch.ones(length, length, device=device).tril(), i.unsqueeze(0) - i.unsqueeze(1) + max_len - 1


@dataclass
class Group:
    """Rows of similar length: jagged values [start, end) of the permuted batch, padded to `length`."""

    start: int
    end: int
    offsets: torch.Tensor  # [n + 1], relative to `start`
    length: int  # the group's longest row
    buckets: torch.Tensor  # [n, L, L] int64 time bucket of query i vs key j
    causal: torch.Tensor  # [L, L] float, 1 where key j <= query i
    rel: torch.Tensor  # [L, L] int64, j - i + max_len - 1 (index into the relative-position table)


@dataclass
class JaggedLayout:
    """`perm` reorders the batch's jagged values [N] so that `groups` are contiguous ranges of them."""

    perm: torch.Tensor  # [N] int64: permuted value k is original value perm[k]
    positions: torch.Tensor  # [N] position of each permuted value inside its row (0 = oldest)
    groups: list[Group]

    def scatter_back(self, x: torch.Tensor) -> torch.Tensor:
        """Permuted jagged [N, ...] -> original order."""
        return x.new_empty(x.shape).index_copy(0, self.perm, x)


def plan(lengths: torch.Tensor, timestamps: torch.Tensor, query_ts: torch.Tensor, max_len: int,
         num_buckets: int, host_lengths: torch.Tensor | None = None) -> JaggedLayout:
    """lengths [B]; timestamps / query_ts [N] jagged -> the layout every HSTU layer of this batch uses.

    The group boundaries are Python ints, so the sorted lengths must be on the host. `host_lengths`
    (the same [B] lengths on the CPU, as the loader made them: `Batch.host_lengths`) gives them with
    no device read; without it they are read back from `lengths` once, a sync on a GPU. Their offsets
    are summed on the host rather than read back a second time; rows of length 0 join no group.
    """
    if torch.compiler.is_exporting():
        return padded_layout(lengths, timestamps, query_ts, max_len, num_buckets)
    device = lengths.device
    lengths = lengths.long()
    offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
    order = torch.argsort(lengths, descending=True, stable=True)
    sorted_len = lengths[order]
    sorted_off = torch.ops.fbgemm.asynchronous_complete_cumsum(sorted_len)
    if host_lengths is not None:
        assert host_lengths.device.type == "cpu" and host_lengths.numel() == lengths.numel(), "host_lengths: [B] on CPU"
        lens = sorted(host_lengths.tolist(), reverse=True)  # the values of sorted_len, tie order aside
    else:
        lens = sorted_len.tolist()
    off_list = [0, *itertools.accumulate(lens)]
    assert off_list[-1] == timestamps.numel() == query_ts.numel(), "timestamps must be jagged by `lengths`"
    within = torch.ops.fbgemm.offsets_range(sorted_off, timestamps.numel())
    perm = torch.repeat_interleave(offsets[:-1][order], sorted_len, output_size=timestamps.numel()) + within
    q_perm, t_perm = query_ts[perm], timestamps[perm]
    groups, row = [], 0
    idx_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    while row < len(lens) and lens[row] > 0:
        longest, end = lens[row], row + 1
        while end < len(lens) and lens[end] > 0 and lens[end] >= GROUP_RATIO * longest:
            end += 1
        start_v, end_v = off_list[row], off_list[end]
        offs = sorted_off[row:end + 1] - start_v
        query = pad_ints(q_perm[start_v:end_v], offs, longest)
        keys = pad_ints(t_perm[start_v:end_v], offs, longest)
        if longest not in idx_cache:
            idx_cache[longest] = _causal_and_rel(longest, max_len, device)
        causal, rel = idx_cache[longest]
        groups.append(Group(start_v, end_v, offs, longest,
                            time_buckets(query.unsqueeze(2) - keys.unsqueeze(1), num_buckets), causal, rel))
        row = end
    return JaggedLayout(perm, within, groups)


def padded_layout(lengths: torch.Tensor, timestamps: torch.Tensor, query_ts: torch.Tensor, max_len: int,
                  num_buckets: int) -> JaggedLayout:
    """The layout of `torch.export` (`trec-rank export`): one group of every row padded to max_len, values
    in their original order. Export traces shapes, not values, so it cannot cut groups from the lengths;
    each row's result is the same (rows never attend to each other, padding sits after each row's end,
    the 1/N scale is max_len), at the padded cost.
    """
    n, device = timestamps.shape[0], lengths.device
    offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths.long())
    # one fbgemm op rather than pad_ints: its indexed assignment broadcasts a single value, so the trace
    # would guard against a batch of one token (one row, empty history)
    query, keys = (torch.ops.fbgemm.jagged_1d_to_dense(t, offsets, max_len, 0) for t in (query_ts, timestamps))
    group = Group(0, n, offsets, max_len, time_buckets(query.unsqueeze(2) - keys.unsqueeze(1), num_buckets),
                  *_causal_and_rel(max_len, max_len, device))
    return JaggedLayout(torch.arange(n, device=device), torch.ops.fbgemm.offsets_range(offsets, n), [group])


class _TableGather(torch.autograd.Function):
    """weight[index] for a small 1-D table and a big index tensor, with a linear-time backward.

    Autograd's backward of `weight[index]` is an accumulating index_put, which sorts the indices on
    CPU; index_add_ over the flat gradient gives the same sums without the sort.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(index)
        ctx.size = weight.shape[0]
        return weight[index]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        (index,) = ctx.saved_tensors
        out = grad.new_zeros(ctx.size).index_add_(0, index.reshape(-1), grad.reshape(-1))
        return out, None


def table_gather(weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """weight [V] gathered at index (any shape) -> index.shape, differentiable in weight."""
    return _TableGather.apply(weight, index)
