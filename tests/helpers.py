"""Run the real CLI in subprocesses: one process, or N ranks under torchrun (gloo on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, nproc: int = 1, timeout: int = 600, env: dict | None = None,
            check: bool = True, max_restarts: int = 0) -> subprocess.CompletedProcess:
    """`trec-rank ARGS` in a fresh interpreter; with nproc > 1 (or restarts) under torchrun --standalone."""
    cmd = [sys.executable, "-m", "trec_rank.cli", *args]
    if nproc > 1 or max_restarts:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               f"--max-restarts={max_restarts}", "-m", "trec_rank.cli", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), parents before children. torchrun starts each worker
    in a session of its own, so a kill test must find them to kill the whole job."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out
