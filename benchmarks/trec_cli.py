"""The one way every benchmark runs trec-rank: its CLI in a fresh process, and what the run wrote.

A fresh interpreter per measurement keeps one run's threads, caches and allocator state out of the
next one (and its peak RSS its own); a DataLoader that forks workers in a process whose process
group was destroyed can also hang, which a new process never meets. Options cover what the scripts
need: torchrun for several ranks, the step clock (step_clock.py) around a one-rank run, and another
revision's code (train_throughput.py --baseline).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def set_args(sets: list[str]) -> list[str]:
    """["k=v", ...] -> ["--set", "k=v", ...]."""
    return [a for s in sets for a in ("--set", s)]


def run(cmd: list[str], *, threads: int, what: str, code: Path = ROOT, timeout: float = 7200) -> tuple[str, float]:
    """Any benchmark subprocess (trec-rank, or a peer in .venv-peers) with `threads` intra-op threads and
    `code` on its path; returns its stdout and wall seconds. A failure ends the benchmark with its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(code)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"error: {what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout, wall


def run_cli(args: list[str], *, threads: int = 1, nproc: int = 1, code: Path = ROOT, clock: Path | None = None
            ) -> tuple[str, float]:
    """`trec-rank ARGS`: under torch.distributed.run (--standalone) when nproc > 1; under step_clock.py,
    which writes the per-step summary to `clock`, for a one-rank job; `code` is the checkout whose
    trec_rank runs (this one unless a benchmark compares revisions)."""
    assert clock is None or nproc == 1, "the step clock times one process"
    if clock is not None:
        cmd = [sys.executable, str(HERE / "step_clock.py"), str(clock), "--", *args]
    elif nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "trec_rank.cli", *args]
    else:
        cmd = [sys.executable, "-m", "trec_rank.cli", *args]
    return run(cmd, threads=threads, what=f"trec-rank {args[0]} on {nproc} rank(s)", code=code)


def train(config: Path, sets: list[str], run_dir: Path, *, threads: int = 1, nproc: int = 1, code: Path = ROOT,
          clock: Path | None = None) -> dict:
    """`trec-rank train CONFIG --run-dir RUN_DIR --set ...` (options as run_cli); its throughput.json."""
    run_cli(["train", str(config), "--run-dir", str(run_dir), *set_args(sets)], threads=threads, nproc=nproc,
            code=code, clock=clock)
    return json.loads((run_dir / "throughput.json").read_text())
