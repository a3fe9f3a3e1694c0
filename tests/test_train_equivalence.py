"""1 rank vs 2 ranks on the same global batches, and a 2-rank checkpoint continued on 1 rank.

The loader gives rank r the r-th contiguous half of the rows, so two copies of the same rows are
written: `two/` in rank order (rank 0's rows, then rank 1's) and `one/` interleaved so that one
rank with batch 2B sees, at every step, exactly the union of the two ranks' B-row batches.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import run_cli

B, STEPS = 64, 12  # per-rank batch, steps per epoch


@pytest.fixture(scope="module")
def twin_data(ml100k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("twins")
    rows = pq.read_table(ml100k_dir / "ranking" / "train").slice(0, 2 * B * STEPS)
    half = B * STEPS
    order = [j for i in range(STEPS) for j in (*range(i * B, (i + 1) * B), *range(half + i * B, half + (i + 1) * B))]
    for name, table in (("two", rows), ("one", rows.take(pa.array(order)))):
        (root / name / "train").mkdir(parents=True)
        pq.write_table(table, root / name / "train" / "part-00000.parquet", row_group_size=100)
        for split in ("valid", "test"):
            (root / name / split).symlink_to(ml100k_dir / "ranking" / split)
    return root / "one", root / "two"


@pytest.fixture(scope="module")
def init(twin_data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared initial weights: a table's random init depends on how it is sharded."""
    run = tmp_path_factory.mktemp("init")
    run_cli("train", "configs/ml100k_base.yaml", "--run-dir", str(run), "--set", f"data.path={twin_data[0]}",
            "--set", "train.max_steps=1", "--set", "train.optim.sparse_lr=0.0", "--set", "train.optim.dense_lr=0.0")
    return run


def train(run: Path, data: Path, batch: int, nproc: int, *sets: str, resume: bool = False,
          init: Path | None = None) -> None:
    args = ["train", "configs/ml100k_base.yaml", "--run-dir", str(run), "--set", f"data.path={data}",
            *(["--init-from", str(init)] if init else []),
            "--set", f"data.batch_size={batch}", "--set", "data.shuffle=false", "--set", "train.log_rows=true",
            "--set", "train.eval_every=0", *(["--resume"] if resume else [])]
    for s in sets:
        args += ["--set", s]
    run_cli(*args, nproc=nproc)


def losses(run: Path, nproc: int) -> dict[int, float]:
    per_rank = []
    for r in range(nproc):
        entries = [json.loads(line) for line in (run / "rows" / f"rank-{r}.jsonl").read_text().splitlines()]
        per_rank.append({e["step"]: e["loss"] for e in entries})
    return {s: sum(p[s] for p in per_rank) / nproc for s in per_rank[0]}


def test_one_rank_equals_two_ranks_for_the_same_global_batch(twin_data: tuple[Path, Path], init: Path,
                                                             tmp_path: Path) -> None:
    one, two = twin_data
    train(tmp_path / "a", one, 2 * B, 1, "train.epochs=1", init=init)
    train(tmp_path / "b", two, B, 2, "train.epochs=1", init=init)
    la, lb = losses(tmp_path / "a", 1), losses(tmp_path / "b", 2)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    for step in la:
        assert la[step] == pytest.approx(lb[step], abs=2e-5), step
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert ma["test"]["like/auc"] == pytest.approx(mb["test"]["like/auc"], abs=1e-4)


def test_two_rank_checkpoint_continues_on_one_rank(twin_data: tuple[Path, Path], init: Path, tmp_path: Path) -> None:
    one, two = twin_data
    train(tmp_path / "x", two, B, 2, "train.epochs=1", init=init)  # epoch 1 on 2 ranks, checkpoint at its end
    train(tmp_path / "x", one, 2 * B, 1, "train.epochs=2", resume=True)  # epoch 2 resharded onto 1 rank
    train(tmp_path / "z", one, 2 * B, 1, "train.epochs=2", init=init)  # uninterrupted, 1 rank
    lx, lz = losses(tmp_path / "x", 1), losses(tmp_path / "z", 1)
    for step in range(STEPS + 1, 2 * STEPS + 1):
        assert lx[step] == pytest.approx(lz[step], abs=5e-5), step
    mx = json.loads((tmp_path / "x" / "metrics.json").read_text())
    mz = json.loads((tmp_path / "z" / "metrics.json").read_text())
    for key in ("like/auc", "like/logloss"):
        assert mx["test"][key] == pytest.approx(mz["test"][key], abs=1e-4)
