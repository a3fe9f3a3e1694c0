"""Run lifecycle on real training processes: checkpoint before eval, run-dir ownership, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.helpers import ROOT, run_cli
from trec_rank.runtime.checkpoint import complete_checkpoints

CONFIG = "configs/ml100k_base.yaml"


def args(run: Path, data: Path, *sets: str, flags: tuple[str, ...] = ()) -> list[str]:
    out = ["train", CONFIG, "--run-dir", str(run), *flags, "--set", f"data.path={data}/ranking",
           "--set", "data.eval_splits=[valid]"]
    for s in sets:
        out += ["--set", s]
    return out


def history_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics_history.jsonl").read_text().splitlines()]


def test_eval_failure_loses_nothing_and_resume_does_not_duplicate_history(ml100k_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = ("train.max_steps=10", "train.eval_every=5")
    proc = run_cli(*args(run, ml100k_dir, *sets), env={"TREC_RANK_FAULT": "eval:10:0"}, check=False)
    assert proc.returncode != 0
    # the step-10 checkpoint was written before the eval that died
    assert [p.name for p in complete_checkpoints(run / "checkpoints")][-1] == "step-00000010"
    assert history_steps(run) == [5]
    run_cli(*args(run, ml100k_dir, *sets, flags=("--resume",)))
    assert history_steps(run) == [5, 10]  # the pending eval of step 10 ran once, nothing twice
    trained = json.loads((run / "metrics.json").read_text())["valid"]
    # `eval` writes under the run dir, outside checkpoints/ (which rotation prunes); no third-party warnings
    evaluate = ["eval", CONFIG, "--checkpoint", str(run), "--set", f"data.path={ml100k_dir}/ranking",
                "--splits", "valid"]
    shown = {"PYTHONWARNINGS": "default"}  # run_cli hides Python warnings by default
    quiet = run_cli(*evaluate, env=shown)
    assert json.loads((run / "eval" / "step-00000010" / "metrics.json").read_text())["valid"] == trained
    assert not (run / "checkpoints" / "step-00000010" / "metrics.json").exists()
    assert "Warning" not in quiet.stderr and "eval:" in quiet.stderr  # the eval progress bar
    assert "Warning" in run_cli("-v", *evaluate, env=shown).stderr


def test_run_dir_belongs_to_one_run(ml100k_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = ("train.max_steps=4",)
    # a run that fails before its first step leaves nothing that refuses the corrected rerun
    proc = run_cli(*args(run, ml100k_dir, *sets), env={"TREC_RANK_FAULT": "nan:1:0"}, check=False)
    assert proc.returncode == 3 and not (run / "config.json").exists() and not (run / "run.json").exists()
    run_cli(*args(run, ml100k_dir, *sets))
    first = json.loads((run / "run.json").read_text())
    throughput = json.loads((run / "throughput.json").read_text())
    assert throughput["steps"] == 4 and throughput["train_seconds"] > 0
    refused = run_cli(*args(run, ml100k_dir, *sets), check=False)
    assert refused.returncode == 2
    lines = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"run {first['run_id']}" in lines[0] and "step-00000004" in lines[0]
    assert "--resume" in lines[0] and "--overwrite" in lines[0]
    # resuming a finished run keeps the whole run's throughput
    run_cli(*args(run, ml100k_dir, *sets, flags=("--resume",)))
    assert json.loads((run / "throughput.json").read_text()) == throughput
    assert json.loads((run / "run.json").read_text()) == first
    run_cli(*args(run, ml100k_dir, "train.max_steps=2", flags=("--overwrite",)))
    assert json.loads((run / "run.json").read_text())["run_id"] != first["run_id"]
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step-00000002"]
    assert history_steps(run) == [2]


def _torchrun(*cli_args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "trec_rank.cli", *cli_args]


def test_sigterm_stops_every_rank_with_a_checkpoint_and_resume_matches(ml100k_dir: Path, tmp_path: Path) -> None:
    sets = ("train.max_steps=300", "train.log_every=5", "train.checkpoint_every=1000")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(_torchrun(*args(stopped, ml100k_dir, *sets)), cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (stopped / "run.json").exists():  # written at the first sync: training is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # what a cluster does to a preempted pod's launcher
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted at step")]
    assert len(lines) == 1, stderr[-3000:]
    step = int(lines[0].split()[3].rstrip(";"))
    assert lines[0] == f"interrupted at step {step}; checkpoint step-{step} saved; rerun with --resume"
    assert 0 < step < 300 and step % 5 == 0
    # no traceback from our processes (torchrun, the launcher, prints its own SignalException)
    assert not [line for line in stderr.splitlines() if 'File "' in line and "trec_rank" in line], stderr[-3000:]
    assert [p.name for p in complete_checkpoints(stopped / "checkpoints")] == [f"step-{step:08d}"]
    resumed = run_cli(*args(stopped, ml100k_dir, *sets, flags=("--resume",)), nproc=2)
    assert resumed.stderr.count("resumed from") == 1  # under torchrun only rank 0 reports
    straight = tmp_path / "straight"
    run_cli(*args(straight, ml100k_dir, *sets), nproc=2)
    a = json.loads((straight / "metrics.json").read_text())["valid"]
    b = json.loads((stopped / "metrics.json").read_text())["valid"]
    for key, value in a.items():
        assert abs(b[key] - value) < 1e-5, key


def test_eval_at_any_world_size_matches_one_rank(adult_dir: Path, tmp_path: Path) -> None:
    """4 ranks on a valid split smaller than eval_batch_size x 4 (torchrec refused its metric window)."""
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    (data / "valid").mkdir(parents=True)
    for split in ("train", "test"):
        (data / split).symlink_to(adult_dir / "adult" / split)
    rows = pq.read_table(adult_dir / "adult" / "valid").slice(0, 700)
    pq.write_table(rows, data / "valid" / "part-00000.parquet")
    sets = ["--set", f"data.path={data}", "--set", "data.eval_batch_size=256"]
    run_cli("train", "configs/adult_mmoe.yaml", "--run-dir", str(tmp_path / "run"), "--set", "train.max_steps=3",
            "--set", "data.eval_splits=[]", *sets)
    got = {}
    for nproc in (1, 4):
        out = tmp_path / f"eval{nproc}"
        run_cli("eval", "configs/adult_mmoe.yaml", "--checkpoint", str(tmp_path / "run"), "--run-dir", str(out),
                "--splits", "valid", *sets, nproc=nproc)
        got[nproc] = json.loads((out / "metrics.json").read_text())["valid"]
    assert got[1].keys() == got[4].keys() and "income/auc" in got[1]
    for key, value in got[1].items():
        assert abs(got[4][key] - value) < 1e-6, (key, got[4][key], value)


def test_resume_under_a_plan_that_splits_columns_is_refused_naming_the_table(ml100k_dir: Path, tmp_path: Path) -> None:
    """table_wise -> column_wise (2 column blocks of 128): the rowwise_adagrad state has one value per row and
    column block, which DCP cannot split; one line names the table, both layouts and the ways out."""
    import yaml

    from trec_rank.config.experiment import read_config

    cfg = read_config(ROOT / CONFIG)  # schema file inlined: the copy is written elsewhere
    next(t for t in cfg["schema"]["tables"] if t["name"] == "user")["embedding_dim"] = 256
    config = tmp_path / "wide_user.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    common = ["--run-dir", str(run), "--set", f"data.path={ml100k_dir}/ranking", "--set", "data.eval_splits=[]"]
    run_cli("train", str(config), *common, "--set", "train.max_steps=2",
            "--set", "sharding.constraints.user={sharding_types: [table_wise]}", nproc=2)
    proc = run_cli("train", str(config), *common, "--resume", "--set", "train.max_steps=4",
                   "--set", "sharding.constraints.user={sharding_types: [column_wise]}", nproc=2, check=False)
    assert proc.returncode != 0
    lines = {line for line in proc.stderr.splitlines() if line.startswith("error:")}
    assert len(lines) == 1, proc.stderr[-4000:]
    line = lines.pop()
    assert "table user was trained table_wise" in line and "now column_wise (2)" in line and "--init-from" in line
    # the way out it names works: the weights reshard onto the column-wise plan, the optimizer starts fresh
    run_cli("train", str(config), "--run-dir", str(tmp_path / "warm"), "--init-from", str(run),
            "--set", f"data.path={ml100k_dir}/ranking", "--set", "data.eval_splits=[]", "--set", "train.max_steps=2",
            "--set", "sharding.constraints.user={sharding_types: [column_wise]}", nproc=2)


def test_rng_state_holds_the_gpu_generator_only_once_cuda_is_in_use() -> None:
    from trec_rank.runtime.checkpoint import rng_state

    state = rng_state()
    assert torch.equal(state["torch"], torch.get_rng_state())
    assert ("cuda" in state) == (torch.cuda.is_available() and torch.cuda.is_initialized())
    if torch.cuda.is_available():  # on a GPU machine: saved and restored with the CPU one
        torch.zeros(1, device="cuda")
        assert torch.equal(rng_state()["cuda"], torch.cuda.get_rng_state())


def test_train_loss_is_the_mean_over_the_logging_interval(ml100k_dir: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    run_cli(*args(run, ml100k_dir, "train.max_steps=10", "train.log_every=5", "train.log_rows=true"))
    losses = {json.loads(line)["step"]: json.loads(line)["loss"]
              for line in (run / "rows" / "rank-0.jsonl").read_text().splitlines()}
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(logged) == [5, 10]
    for step, value in logged.items():
        mean = sum(losses[s] for s in range(step - 4, step + 1)) / 5
        assert abs(value - mean) < 1e-5 and abs(value - losses[step]) > 1e-6


def test_damaged_checkpoint_is_named_and_a_failed_score_leaves_no_job_record(ml100k_dir: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    run_cli(*args(run, ml100k_dir, "train.max_steps=3", "data.eval_splits=[]"))
    good = complete_checkpoints(run / "checkpoints")[-1]
    damaged = tmp_path / "damaged" / "checkpoints" / good.name
    shutil.copytree(good, damaged)
    shard = damaged / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])  # cut short: every tensor stored there is lost
    data = ["--set", f"data.path={ml100k_dir}/ranking"]
    proc = run_cli("eval", CONFIG, "--checkpoint", str(damaged), "--splits", "valid", *data, check=False)
    assert proc.returncode == 2 and f"error: {shard}: damaged checkpoint file (cut short" in proc.stderr, proc.stderr
    out = tmp_path / "scores"
    score = ["score", CONFIG, "--input", str(ml100k_dir / "ranking" / "test"), "--output", str(out), *data]
    proc = run_cli(*score, "--checkpoint", str(damaged), check=False)
    assert proc.returncode == 2 and f"error: {shard}: damaged checkpoint file" in proc.stderr, proc.stderr
    assert not (out / "_job.json").exists()
    run_cli(*score, "--checkpoint", str(run))  # the corrected rerun into the same --output
    assert (out / "_SUCCESS").is_file()
