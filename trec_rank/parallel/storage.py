"""Shared-storage check: every rank of a job must see the same run directory.

On a cluster a `run_dir` on each pod's own disk looks fine until the first checkpoint: DCP
writes each rank's shards where that rank stands, rank 0 renames only its own temporary
directory, and no checkpoint is ever complete, so resume, retries and scoring fail hours later.
Proving at start that a file written by rank 0 is visible to every rank turns that into one
line before the first step.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import torch.distributed as dist

MESSAGE = "run_dir must be on storage shared by every node (mount it with --mounts)"


def check_shared_dir(path: Path) -> None:
    """Collective: rank 0 writes a random token under `path`, every rank reads it back.

    Raises ValueError (the same one line on every rank, so all of them stop) when any rank does
    not read the token; the ranks that failed are named after the line."""
    rank = dist.get_rank()
    token = [secrets.token_hex(8) if rank == 0 else ""]
    dist.broadcast_object_list(token, src=0)
    probe = path / f".shared-check-{token[0]}"
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text(token[0])
    dist.barrier()
    try:
        seen = probe.read_text() == token[0]
    except OSError:
        seen = False
    everyone: list[bool] = [False] * dist.get_world_size()
    dist.all_gather_object(everyone, seen)  # every rank stops, not only the ones that cannot see it
    if rank == 0:
        probe.unlink()
    missing = [r for r, ok in enumerate(everyone) if not ok]
    if missing:
        raise ValueError(f"{MESSAGE}: ranks {missing} do not see {path} as rank 0 does")
