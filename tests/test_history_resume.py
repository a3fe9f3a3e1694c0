"""A resume keeps the eval history of the checkpoint's past and drops only what it will redo.

Found while resuming a stopped HSTU grid run: its checkpoint had been written after its epoch's eval
(no eval pending), yet the resume dropped that eval's line and never redid it, so metrics_history.jsonl
lost one epoch for good. Entries *after* the checkpoint's step are always redone; the one *at* it only
when the checkpoint was saved right before its eval (`eval_pending`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trec_rank.parallel.env import DistEnv
from trec_rank.runtime.run import Run


@pytest.mark.parametrize(("eval_pending", "kept"), [(True, [8]), (False, [8, 16])])
def test_truncate_history_keeps_the_eval_at_the_checkpoint_unless_it_is_pending(
        tmp_path: Path, eval_pending: bool, kept: list[int]) -> None:
    history = tmp_path / "metrics_history.jsonl"
    history.write_text("".join(json.dumps({"epoch": s // 8, "step": s}) + "\n" for s in (8, 16, 24)))
    run = Run(tmp_path, DistEnv(0, 1, 0, 1, torch.device("cpu")), None, {}, "test")  # type: ignore[arg-type]
    run.truncate_history(16, eval_pending)
    assert [json.loads(line)["step"] for line in history.read_text().splitlines()] == kept
