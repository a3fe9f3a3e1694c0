"""What plain eager PyTorch does on this machine at the issue's shapes, with no TorchRec at all.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eager_floor.py [--json]

A bound for benchmarks/train_throughput.py, measured in the same run: one training step
(forward, backward, Adam on the dense part, Adagrad on one nn.Embedding) on synthetic batches of
256 rows already in memory, so no loader, no sharding, no pipeline, no metrics.
  mmoe: 12 sparse features (emb 8) + 6 dense, 4 experts [64], 2 softmax gates, towers [32].
  din:  trec_rank's TargetAttention (Dice, [64, 32], factorised) over 35 behaviours per row on
        average (ml-100k's mean history length, max 50) of 32-d keys (item + genre at 16 each),
        then the Dice top MLP [200, 80]; no embedding lookups, no L2.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trec_rank.models.attention import AttentionParams, TargetAttention
from trec_rank.models.dice import make_activation
from trec_rank.models.layers import MLP

B = 256


def _time(step: Callable[[], None], warmup: int = 10, reps: int = 5, n: int = 30) -> float:
    """Best-of-`reps` seconds per step (the machine is shared: the best window is the least loaded)."""
    for _ in range(warmup):
        step()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def mmoe_step() -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    emb = nn.Embedding(12 * 42, 8)
    ids, dense = torch.randint(0, 12 * 42, (B, 12), generator=g), torch.randn(B, 6, generator=g)
    labels = torch.randint(0, 2, (B, 2), generator=g).float()
    width = 12 * 8 + 6
    experts = nn.ModuleList([MLP(width, [64]) for _ in range(4)])
    gates = nn.ModuleList([nn.Linear(width, 4) for _ in range(2)])
    towers = nn.ModuleList([nn.Sequential(MLP(64, [32]), nn.Linear(32, 1)) for _ in range(2)])
    dense_opt = torch.optim.Adam([*experts.parameters(), *gates.parameters(), *towers.parameters()], foreach=True)
    sparse_opt = torch.optim.Adagrad(emb.parameters(), lr=0.05)

    def step() -> None:
        x = torch.cat([emb(ids).flatten(1), dense], dim=1)
        e = torch.stack([m(x) for m in experts], dim=1)
        loss = sum(F.binary_cross_entropy_with_logits(
            towers[t](torch.einsum("bn,bnh->bh", torch.softmax(gates[t](x), -1), e)).squeeze(-1), labels[:, t])
            for t in range(2))
        dense_opt.zero_grad()
        sparse_opt.zero_grad()
        loss.backward()
        dense_opt.step()
        sparse_opt.step()

    return step


def din_step() -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 71, (B,), generator=g).clamp(max=50)  # mean ~35
    keys = torch.randn(int(lengths.sum()), 32, generator=g, requires_grad=True)
    query = torch.randn(B, 32, generator=g, requires_grad=True)
    other = torch.randn(B, 194 - 32, generator=g)
    labels = torch.randint(0, 2, (B,), generator=g).float()
    unit = TargetAttention(32, AttentionParams(hidden=[64, 32]))
    top = nn.Sequential(MLP(194, [200, 80], act=make_activation("dice")), nn.Linear(80, 1))
    opt = torch.optim.Adam([*unit.parameters(), *top.parameters()], foreach=True)

    def step() -> None:
        h = torch.cat([other, unit(query, keys, lengths)], dim=1)
        loss = F.binary_cross_entropy_with_logits(top(h).squeeze(-1), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def floors() -> dict[str, float]:
    """model -> samples/s of the eager step."""
    return {name: B / _time(make()) for name, make in (("din", din_step), ("mmoe", mmoe_step))}


if __name__ == "__main__":
    torch.set_num_threads(1)
    result = floors()
    if sys.argv[1:] == ["--json"]:
        print(json.dumps(result))
    else:
        for name, rate in result.items():
            print(f"{name:5} eager floor: {rate:>9,.0f} samples/s ({1000 * B / rate:.2f} ms/step)")
