"""`trec-rank score` on 2 ranks SIGKILLed at random points, then rerun: every input row scored exactly once.

The input is the real ml-100k ranking train split symlinked COPIES times (a few hundred thousand rows,
so a run lasts several seconds). For each seed the job is killed, process group by process group, after
a seeded random number of finished parts (up to half; counted in parts, not seconds, so a fast machine
cannot finish first); the rerun (same arguments, 2 ranks) must finish with one output row per input
row, row_index unique and equal to the input's, `_SUCCESS` present only then, and no temporaries of the
killed run left behind.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.helpers import ROOT, descendants, run_cli

CONFIG = "configs/ml100k_base.yaml"
COPIES = 6
BATCH, PART = "1024", "8192"


@pytest.fixture(scope="module")
def scored_input(ml100k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """(checkpoint run dir, input dir of COPIES symlinked train splits, input rows)."""
    root = tmp_path_factory.mktemp("reliability-score")
    run = root / "run"
    run_cli("train", CONFIG, "--run-dir", str(run), "--set", f"data.path={ml100k_dir}/ranking",
            "--set", "train.epochs=1", "--set", "train.max_steps=5", "--set", "data.eval_splits=[valid]")
    data, rows = root / "input", 0
    data.mkdir()
    for c in range(COPIES):
        for f in sorted((ml100k_dir / "ranking" / "train").glob("part-*.parquet")):
            (data / f"copy{c}-{f.name}").symlink_to(f)
            rows += pq.ParquetFile(f).metadata.num_rows
    return run, data, rows


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group (start_new_session) and the groups of its workers:
    torch elastic starts every worker in a session of its own."""
    groups = []
    for p in [*descendants(proc.pid), proc.pid]:
        try:
            groups.append(os.getpgid(p))
        except ProcessLookupError:
            pass
    for g in dict.fromkeys(reversed(groups)):  # workers first, so the launcher cannot react
        try:
            os.killpg(g, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def score_argv(ckpt: Path, data: Path, out: Path) -> list[str]:
    return ["score", CONFIG, "--checkpoint", str(ckpt), "--input", str(data), "--output", str(out),
            "--batch-size", BATCH, "--part-rows", PART]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_score_killed_at_random_point_then_rerun_is_exactly_once(seed: int, scored_input: tuple[Path, Path, int],
                                                                tmp_path: Path) -> None:
    ckpt, data, rows = scored_input
    out = tmp_path / "out"
    n_parts = -(-rows // int(PART))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "trec_rank.cli", *score_argv(ckpt, data, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    target = random.Random(seed).randint(1, n_parts // 2)  # kill point in parts, not seconds: machine speed varies
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while len(list(out.glob("part-*.parquet"))) < target and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.005)
        finished_alone = proc.poll() is not None
        kill_job(proc)
    parts_at_kill = len(list(out.glob("part-*.parquet")))
    assert parts_at_kill >= 1, (tmp_path / "killed.log").read_text()[-3000:]
    if finished_alone:  # only a run that completed may have claimed success
        assert proc.returncode == 0 and (out / "_SUCCESS").is_file()
    else:
        assert not (out / "_SUCCESS").exists(), f"_SUCCESS after a kill with {parts_at_kill}/{n_parts} parts"

    rerun = run_cli(*score_argv(ckpt, data, out), nproc=2)
    assert f"rows_in={rows} rows_out={rows}" in rerun.stdout, rerun.stdout[-2000:]
    assert (out / "_SUCCESS").is_file()
    assert not list(out.glob(".part-*")), "temporaries of the killed run left behind"
    assert len(list(out.glob("part-*.parquet"))) == n_parts
    row_index = pq.read_table(out, columns=["row_index"])["row_index"].to_numpy()
    assert len(row_index) == rows
    np.testing.assert_array_equal(np.sort(row_index), np.arange(rows))  # unique, and exactly the input's rows
    print(f"seed {seed}: killed at >= {target} parts with {parts_at_kill}/{n_parts} parts done "
          f"(finished before the kill: {finished_alone})")
