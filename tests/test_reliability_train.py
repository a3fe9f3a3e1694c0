"""Fault injection on real training runs: NaN guard, elastic restart after SIGKILL, crash inside a save."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.helpers import run_cli
from trec_rank.runtime.checkpoint import complete_checkpoints

CONFIG = "configs/ml100k_base.yaml"


def train_args(run: Path, data: Path, *sets: str) -> list[str]:
    args = ["train", CONFIG, "--run-dir", str(run), "--resume", "--set", f"data.path={data}/ranking"]
    for s in ("train.eval_every=0", *sets):
        args += ["--set", s]
    return args


def rows_by_step(run: Path, rank: int) -> dict[int, list[int]]:
    """The last logged rows of every step (a resumed run overwrites the steps after its checkpoint)."""
    out: dict[int, list[int]] = {}
    for line in (run / "rows" / f"rank-{rank}.jsonl").read_text().splitlines():
        entry = json.loads(line)
        out[entry["step"]] = entry["rows"]
    return out


def test_nan_loss_stops_with_step_and_rows_and_keeps_last_checkpoint(ml100k_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_cli(*train_args(run, ml100k_dir, "train.max_steps=30", "train.checkpoint_every=5"),
                   env={"TREC_RANK_FAULT": "nan:12:0"}, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "error: non-finite loss at step 12" in proc.stderr
    assert re.search(r"dataset rows \d+\.\.\d+ on rank 0", proc.stderr), proc.stderr[-2000:]
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step-00000005", "step-00000010"]
    assert not (run / "metrics.json").exists()
    run_cli("eval", CONFIG, "--checkpoint", str(run), "--run-dir", str(tmp_path / "ev"),
            "--set", f"data.path={ml100k_dir}/ranking")  # the last good checkpoint loads


def test_nan_loss_skip_policy_drops_the_batch(ml100k_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_cli(*train_args(run, ml100k_dir, "train.max_steps=20", "train.nan_policy=skip", "train.log_rows=true"),
                   env={"TREC_RANK_FAULT": "nan:7:0"})
    assert "non-finite loss, batch skipped" in proc.stderr
    steps = rows_by_step(run, 0)
    assert sorted(steps) == list(range(1, 21))  # 20 optimizer steps, the poisoned batch not among them
    assert json.loads((run / "metrics.json").read_text())["test"]["like/auc"] > 0.55


def test_elastic_restart_after_sigkill_consumes_exactly_the_same_rows(ml100k_dir: Path, tmp_path: Path) -> None:
    sets = ("train.max_steps=40", "train.checkpoint_every=10", "train.log_rows=true")
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    run_cli(*train_args(clean, ml100k_dir, *sets), nproc=2)
    proc = run_cli(*train_args(faulty, ml100k_dir, *sets), nproc=2, max_restarts=1,
                   env={"TREC_RANK_FAULT": "kill:25:1"})
    assert "resumed from" in proc.stderr and "step-00000020" in proc.stderr
    for rank in (0, 1):
        expected, got = rows_by_step(clean, rank), rows_by_step(faulty, rank)
        assert sorted(got) == list(range(1, 41)) and got == expected
    a = json.loads((clean / "metrics.json").read_text())
    b = json.loads((faulty / "metrics.json").read_text())
    for split in ("valid", "test"):
        for key, value in a[split].items():
            assert abs(b[split][key] - value) < 1e-5, (split, key)


def test_crash_inside_checkpoint_save_leaves_previous_checkpoint(ml100k_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = ("train.max_steps=30", "train.checkpoint_every=10")
    proc = run_cli(*train_args(run, ml100k_dir, *sets), nproc=2, env={"TREC_RANK_FAULT": "save:20:0"}, check=False)
    assert proc.returncode != 0
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step-00000010"]
    assert (run / "checkpoints" / "step-00000020.tmp").is_dir()  # the torn save, never taken as complete
    proc = run_cli(*train_args(run, ml100k_dir, *sets), nproc=2)
    assert "resumed from" in proc.stderr and "step-00000010" in proc.stderr
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step-00000020", "step-00000030"]
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_nan_on_one_rank_stops_every_rank_in_the_plain_loop(ml100k_dir: Path, tmp_path: Path) -> None:
    """The NaN decision is all-reduced: the clean rank must not run a backward the other one skips."""
    run = tmp_path / "run"
    proc = run_cli(*train_args(run, ml100k_dir, "train.max_steps=10", "train.checkpoint_every=3",
                               "train.pipeline=false"), nproc=2, env={"TREC_RANK_FAULT": "nan:5:0"}, check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("error: non-finite loss at step 5") == 2, proc.stderr[-3000:]
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step-00000003"]
