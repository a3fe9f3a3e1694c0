"""What plain PyTorch does on this machine at the issue's shapes, with no TorchRec at all.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eager_floor.py [--json] [--compile] [--threads 1,2]

A bound for benchmarks/train_throughput.py, measured in the same run: one training step
(forward, backward, Adam on the dense part, Adagrad on one nn.Embedding) on synthetic batches of
256 rows already in memory, so no loader, no sharding, no pipeline, no metrics.
  mmoe: 12 sparse features (emb 8) + 6 dense, 4 experts [64], 2 softmax gates, towers [32]: trec_rank's
        own tower modules (models/towers.py, layers.StackedMLP), as the trainer runs them.
  din:  trec_rank's TargetAttention (Dice, [64, 32], factorised) over 35 behaviours per row on
        average (ml-100k's mean history length, max 50) of 32-d keys (item + genre at 16 each),
        then the Dice top MLP [200, 80]; no embedding lookups, no L2.
--compile adds the same steps with the forward and loss under torch.compile (inductor, C++ kernels
for the elementwise chains; dynamic shapes, since DIN's behaviour count changes per batch), and
--threads measures each at those intra-op thread counts (the machine has 2 cores). If even the
compiled, TorchRec-free dense step is slower than a throughput target, no trainer built on this
stack reaches that target here.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trec_rank.config.models import MoEParams
from trec_rank.models.attention import AttentionParams, TargetAttention
from trec_rank.models.dice import make_activation
from trec_rank.models.layers import MLP, StackedLinear, StackedMLP
from trec_rank.models.towers import build_network

B = 256
Loss = Callable[[], torch.Tensor]


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


def mmoe_loss() -> tuple[Loss, list[torch.optim.Optimizer]]:
    g = torch.Generator().manual_seed(0)
    emb = nn.Embedding(12 * 42, 8)
    ids, dense = torch.randint(0, 12 * 42, (B, 12), generator=g), torch.randn(B, 6, generator=g)
    labels = torch.randint(0, 2, (2, B), generator=g).float()
    width = 12 * 8 + 6
    # the trainer's own dense modules (experts and gates, then the stacked towers and heads), so the floor
    # computes what the trainer computes, the same way, minus TorchRec and the loader
    net = build_network("mmoe", width, ["a", "b"], MoEParams(experts=4, expert_hidden=[64], tower_hidden=[32]),
                        make_activation("relu"), None)
    towers, heads = StackedMLP(2, 64, [32]), StackedLinear(2, 32, 1)
    dense_opt = torch.optim.Adam([*net.parameters(), *towers.parameters(), *heads.parameters()], fused=True)
    sparse_opt = torch.optim.Adagrad(emb.parameters(), lr=0.05)

    def loss() -> torch.Tensor:
        x = torch.cat([emb(ids).flatten(1), dense], dim=1)
        per_task, _ = net.forward_gates(x)
        logits = heads(towers(torch.stack([per_task["a"], per_task["b"]]))).squeeze(-1)  # [2, B]
        return F.binary_cross_entropy_with_logits(logits, labels)

    return loss, [dense_opt, sparse_opt]


def din_loss() -> tuple[Loss, list[torch.optim.Optimizer]]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 71, (B,), generator=g).clamp(max=50)  # mean ~35
    keys = torch.randn(int(lengths.sum()), 32, generator=g, requires_grad=True)
    query = torch.randn(B, 32, generator=g, requires_grad=True)
    other = torch.randn(B, 194 - 32, generator=g)
    labels = torch.randint(0, 2, (B,), generator=g).float()
    unit = TargetAttention(32, AttentionParams(hidden=[64, 32]))
    top = nn.Sequential(MLP(194, [200, 80], act=make_activation("dice")), nn.Linear(80, 1))
    opt = torch.optim.Adam([*unit.parameters(), *top.parameters()], fused=True)

    def loss() -> torch.Tensor:
        h = torch.cat([other, unit(query, keys, lengths)], dim=1)
        return F.binary_cross_entropy_with_logits(top(h).squeeze(-1), labels)

    return loss, [opt]


def make_step(build: Callable[[], tuple[Loss, list[torch.optim.Optimizer]]], compiled: bool) -> Callable[[], None]:
    loss_fn, optimizers = build()
    if compiled:
        loss_fn = torch.compile(loss_fn, dynamic=True)

    def step() -> None:
        for opt in optimizers:
            opt.zero_grad()
        loss_fn().backward()
        for opt in optimizers:
            opt.step()

    return step


def floors(compiled: bool = False) -> dict[str, float]:
    """model -> samples/s of the step (eager, or with the forward under torch.compile)."""
    return {name: B / _time(make_step(build, compiled)) for name, build in (("din", din_loss), ("mmoe", mmoe_loss))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print {model: samples/s} of the eager step only, at "
                   "OMP_NUM_THREADS threads")
    p.add_argument("--compile", action="store_true", help="also the torch.compile'd step")
    p.add_argument("--threads", default="", help="comma-separated intra-op thread counts (default: "
                   "OMP_NUM_THREADS as set)")
    args = p.parse_args()
    if args.json:
        print(json.dumps(floors()))
        return
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    print(f"{'model':5} {'step':8} {'threads':>7} {'samples/s':>10} {'ms/step':>8}")
    for n in threads:
        torch.set_num_threads(n)
        for mode in ("eager", "compiled") if args.compile else ("eager",):
            for name, rate in floors(mode == "compiled").items():
                print(f"{name:5} {mode:8} {n:>7} {rate:>10,.0f} {1000 * B / rate:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
