"""`trec-rank score` through the real CLI: scores vs eval logits, 1 vs 2 (sharded) ranks, kill + rerun
exactly-once under another world size, int8 AUC change, and bad input refused without `_SUCCESS`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers import ROOT, descendants, run_cli

CONFIG = "configs/ml100k_base.yaml"


def read_scores(out: Path) -> dict[str, np.ndarray]:
    """All part files of an output dir, sorted by row_index."""
    table = pq.read_table(out)
    order = np.argsort(table["row_index"].to_numpy(), kind="stable")
    return {c: table[c].to_numpy()[order] for c in table.column_names}


def score(data: str | Path, out: Path, ckpt: Path, *extra: str, nproc: int = 1, check: bool = True,
          sets: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    args = ["score", CONFIG, "--checkpoint", str(ckpt), "--input", str(data), "--output", str(out), *extra]
    for s in sets:
        args += ["--set", s]
    return run_cli(*args, nproc=nproc, check=check)


def kill_job(pid: int) -> None:
    """SIGKILL a launcher and every process below it. torchrun starts each worker in its own session,
    so killing the launcher's process group alone would leave the workers running."""
    tree = [pid, *descendants(pid)]
    for p in reversed(tree):  # workers first, so the launcher cannot react
        try:
            os.killpg(os.getpgid(p), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def trained(ml100k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("score-train")
    run_cli("train", CONFIG, "--run-dir", str(run), "--set", f"data.path={ml100k_dir}/ranking",
            "--set", "train.max_steps=30")
    return run


@pytest.fixture(scope="module")
def one_rank(ml100k_dir: Path, trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("score-1") / "out"
    proc = score(ml100k_dir / "ranking" / "test", out, trained, "--batch-size", "512", "--part-rows", "2048")
    assert "score: rows_in=19633 rows_out=19633 scored=19633" in proc.stdout
    return out


def test_part_layout_is_whole_batches_and_independent_of_ranks() -> None:
    from trec_rank.score.output import default_part_rows, num_parts, part_range, read_window

    assert default_part_rows(19633, 512) == 8192  # small input: one read window per part
    assert default_part_rows(1_061_565, 1024) == 16384  # ~rows/64, in whole 8192-row read windows
    assert default_part_rows(10**9, 1000) == 64000  # capped near 64K rows, whole batches
    assert read_window(16384, 1024) == 8192 and read_window(17 * 1024, 1024) == 1024  # windows divide parts
    assert read_window(2048, 2048) == 2048
    rows, p = 19633, 2048
    ranges = [part_range(k, p, rows) for k in range(num_parts(rows, p))]
    assert ranges[0] == (0, 2048) and ranges[-1] == (18432, 19633)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_scores_equal_eval_logits(one_rank: Path, ml100k_dir: Path, trained: Path) -> None:
    from trec_rank.config.experiment import load_config
    from trec_rank.data.dataset import ParquetDataset
    from trec_rank.parallel.env import init_distributed, shutdown
    from trec_rank.runtime import checkpoint
    from trec_rank.runtime.model import ranking_spec, shard_model

    test_dir = ml100k_dir / "ranking" / "test"
    got = read_scores(one_rank)
    source = pq.read_table(test_dir)
    n = source.num_rows
    assert list(got) == ["row_index", "user_id", "item_id", "p_like"]
    assert got["p_like"].dtype == np.float32
    np.testing.assert_array_equal(got["row_index"], np.arange(n))  # every input row exactly once
    np.testing.assert_array_equal(got["user_id"], source["user_id"].to_numpy())
    np.testing.assert_array_equal(got["item_id"], source["item_id"].to_numpy())
    manifest = json.loads((one_rank / "_SUCCESS").read_text())
    assert manifest["input_rows"] == manifest["output_rows"] == n and manifest["parts"] == 10
    assert manifest["checkpoint"]["step"] == 30 and manifest["last_run"]["model"] == "unsharded"

    cfg = load_config(ROOT / CONFIG, [f"data.path={ml100k_dir}/ranking"])
    env = init_distributed("cpu")
    try:
        model = shard_model(ranking_spec(cfg), env)
        checkpoint.load(checkpoint.resolve(trained), model, None)
        model.eval()
        expected = np.zeros(n, dtype=np.float32)
        with torch.no_grad():
            for batch in ParquetDataset(test_dir, cfg.schema, 1000).batches():
                _, (_, logits, _) = model(batch)
                expected[batch.row_index.numpy()] = torch.sigmoid(logits["like"]).numpy()
    finally:
        shutdown()
    assert np.abs(got["p_like"] - expected).max() < 1e-5
    assert expected.std() > 0.01  # a trained model, not a constant


def test_two_sharded_ranks_match_one_rank(one_rank: Path, ml100k_dir: Path, trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = score(ml100k_dir / "ranking" / "test", out, trained, "--batch-size", "512", "--part-rows", "2048",
                 "--sharded", nproc=2)
    assert "ranks=2 model=sharded" in proc.stdout
    one, two = read_scores(one_rank), read_scores(out)
    np.testing.assert_array_equal(two["row_index"], one["row_index"])
    np.testing.assert_array_equal(two["user_id"], one["user_id"])
    assert np.abs(two["p_like"] - one["p_like"]).max() < 1e-5
    manifest = json.loads((out / "_SUCCESS").read_text())
    assert manifest["last_run"]["world_size"] == 2 and len(manifest["last_run"]["rss_mb"]) == 2


def test_kill_and_rerun_on_another_world_size_is_exactly_once(one_rank: Path, ml100k_dir: Path, trained: Path,
                                                              tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """SIGKILL a 2-rank run mid-way, finish on 1 rank: one row per input row, same scores as a clean run."""
    data, copies = tmp_path / "data", 4
    data.mkdir()
    for c in range(copies):  # 4 identical files: row r of copy c has row_index c*N + r
        os.symlink(ml100k_dir / "ranking" / "test" / "part-00000.parquet", data / f"part-{c}.parquet")
    out, n = tmp_path / "out", 19633
    n_parts = -(-copies * n // 1024)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trec_rank.cli",
           "score", CONFIG, "--checkpoint", str(trained), "--input", str(data), "--output", str(out),
           "--batch-size", "256", "--part-rows", "1024"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while len(list(out.glob("part-*.parquet"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        kill_job(proc.pid)
        proc.wait()
    finished = len(list(out.glob("part-*.parquet")))
    assert 3 <= finished < n_parts, (finished, (tmp_path / "killed.log").read_text()[-3000:])
    assert not (out / "_SUCCESS").exists()

    rerun = score(data, out, trained, "--batch-size", "256")  # part size comes from the first run's _job.json
    assert not list(out.glob(".part-*")), "temporary files of the killed run left behind"
    manifest = json.loads((out / "_SUCCESS").read_text())
    assert manifest["output_rows"] == copies * n and manifest["parts"] == n_parts
    assert manifest["last_run"]["parts_done_before"] >= finished
    assert manifest["last_run"]["scored_rows"] < copies * n
    assert f"rows_in={copies * n} rows_out={copies * n}" in rerun.stdout
    got, clean = read_scores(out), read_scores(one_rank)
    np.testing.assert_array_equal(got["row_index"], np.arange(copies * n))
    for c in range(copies):
        assert np.abs(got["p_like"][c * n:(c + 1) * n] - clean["p_like"]).max() < 1e-6
        np.testing.assert_array_equal(got["user_id"][c * n:(c + 1) * n], clean["user_id"])
    code, stdout, _ = score_in_process(capsys, data, out, trained)
    assert code == 0 and "already complete" in stdout


def test_int8_auc_change_is_small(one_rank: Path, ml100k_dir: Path, trained: Path, tmp_path: Path) -> None:
    proc = score(ml100k_dir / "ranking" / "test", tmp_path / "q", trained, "--quantize", "int8",
                 "--batch-size", "512", "--part-rows", "4096")
    auc = json.loads((tmp_path / "q" / "_SUCCESS").read_text())["last_run"]["auc"]["like"]
    assert auc["rows"] == 19633 and abs(auc["delta"]) < 0.01 and auc["fp32"] > 0.6
    assert "dAUC" in proc.stdout
    fp32, int8 = read_scores(one_rank)["p_like"], read_scores(tmp_path / "q")["p_like"]
    diff = np.abs(fp32 - int8)
    assert 0 < diff.max() < 0.05  # quantized (not identical), but close
    assert abs(auc["fp32"] - _auc(read_scores(one_rank)["p_like"], ml100k_dir)) < 1e-6


def _auc(p: np.ndarray, ml100k_dir: Path) -> float:
    from trec_rank.runtime.metrics import gauc

    y = pq.read_table(ml100k_dir / "ranking" / "test")["like"].to_numpy()
    return gauc(np.zeros(len(y), dtype=np.int64), p.astype(np.float64), y)


def _drop_column(ml100k_dir: Path, tmp_path: Path) -> Path:
    table = pq.read_table(ml100k_dir / "ranking" / "test")
    path = tmp_path / "bad" / "part-0.parquet"
    path.parent.mkdir()
    pq.write_table(table.drop_columns(["hist_genre"]), path)
    return path.parent


def score_in_process(capsys: pytest.CaptureFixture, data: str | Path, out: Path, ckpt: Path, *extra: str,
                     sets: tuple[str, ...] = ()) -> tuple[int, str, str]:
    """The real CLI entry point in this process (no interpreter start): exit code, stdout, stderr."""
    from trec_rank.cli import main

    args = ["score", str(ROOT / CONFIG), "--checkpoint", str(ckpt), "--input", str(data), "--output", str(out),
            *extra, *[a for s in sets for a in ("--set", s)]]
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("case", ["missing_column", "fingerprint", "passthrough", "int8_sharded", "other_job"])
def test_bad_input_is_refused(case: str, one_rank: Path, ml100k_dir: Path, trained: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture) -> None:
    data, out, extra, sets = ml100k_dir / "ranking" / "test", tmp_path / "out", (), ()
    if case == "missing_column":
        data, expected = _drop_column(ml100k_dir, tmp_path), "missing column 'hist_genre'"
    elif case == "fingerprint":
        sets, expected = ("model.params.hidden=[64]",), "fingerprint"
    elif case == "passthrough":
        extra, expected = ("--passthrough", "user_id,nope"), "column 'nope' not found"
    elif case == "int8_sharded":
        extra, expected = ("--quantize", "int8", "--sharded"), "--quantize int8"
    else:
        out, extra, expected = one_rank, ("--batch-size", "512", "--part-rows", "1024"), "another scoring job"
    code, _, err = score_in_process(capsys, data, out, trained, *extra, sets=sets)
    assert code == 2 and expected in err, err[-3000:]
    if case == "other_job":
        assert json.loads((out / "_SUCCESS").read_text())["part_rows"] == 2048  # the earlier job is untouched
    else:
        assert not (out / "_SUCCESS").exists() and not list(out.glob("part-*"))
