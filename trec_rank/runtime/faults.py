"""Fault injection for the reliability tests: kill a rank or poison a batch at a chosen step.

Off unless `TREC_RANK_FAULT` is set, e.g. `kill:30:1` (SIGKILL rank 1 right after step 30),
`save:40:0` (SIGKILL rank 0 inside the checkpoint save of step 40, after its shards are written
and before the checkpoint is renamed complete), `eval:40:0` (SIGKILL rank 0 as the eval of step 40
starts), `nan:25:0` (rank 0's batch for step 25 gets NaN dense features). Faults fire only in the
first attempt of an elastic job (TORCHELASTIC_RESTART_COUNT=0), so the restarted job runs clean
and must recover by itself.
"""

from __future__ import annotations

import os
import signal


def _active(point: str, step: int, rank: int) -> bool:
    spec = os.environ.get("TREC_RANK_FAULT", "")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    try:
        name, at, who = spec.split(":")
        return name == point and int(at) == step and int(who) == rank
    except ValueError:
        raise ValueError(f"TREC_RANK_FAULT: expected POINT:STEP:RANK (e.g. kill:30:1), got {spec!r}") from None


def kill_if(point: str, step: int, rank: int) -> None:
    if _active(point, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def poison_if(step: int, rank: int) -> bool:
    return _active("nan", step, rank)
