"""ML-1M end to end without the download: a synthetic ratings.dat in the ML-1M format -> `trec-rank data ml-1m
--source ratings.dat` (no users.dat / movies.dat beside it) -> the shipped ml1m_hstu / ml1m_sasrec configs train
and evaluate on its sequences (shrunk to a few steps, the configs' model/loss/optimizer settings otherwise kept).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.helpers import ROOT
from trec_rank import cli

USERS, MOVIES = 40, 300


@pytest.fixture(scope="module")
def ml1m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """UserID::MovieID::Rating::Timestamp lines, prepared through the CLI as a user would."""
    root = tmp_path_factory.mktemp("ml1m")
    rng, lines = random.Random(0), []
    for user in range(1, USERS + 1):
        t = 978_300_000 + 1000 * user
        for movie in rng.sample(range(1, MOVIES + 1), rng.randint(20, 60)):
            t += rng.randint(1, 5000)
            lines.append(f"{user}::{movie}::{rng.randint(1, 5)}::{t}")
    (root / "ratings.dat").write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "trec_rank.cli", "data", "ml-1m", "--source", str(root / "ratings.dat"),
           "--out", str(root / "ml-1m")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "ml-1m"


def test_sequences_hold_every_rating_in_time_order(ml1m: Path) -> None:
    rows = pq.read_table(ml1m / "sequences").to_pylist()
    assert len(rows) == USERS
    for row in rows:
        assert row["timestamps"] == sorted(row["timestamps"]) and len(row["item_ids"]) >= 20
        assert 1 <= min(row["item_ids"]) and max(row["item_ids"]) < 3707  # the configs' item table


@pytest.mark.parametrize("config", ["ml1m_hstu", "ml1m_sasrec"])
def test_shipped_ml1m_config_trains_and_evaluates(ml1m: Path, tmp_path: Path, config: str) -> None:
    overrides = [f"data.path={ml1m / 'sequences'}", "data.batch_size=16", "train.epochs=2", "loss.num_negatives=32"]
    run = tmp_path / config
    metrics = cli.train(str(ROOT / "configs" / f"{config}.yaml"), overrides, str(run), resume=False)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == metrics and sorted(saved) == ["test", "valid"]
    assert saved["test"]["users"] == saved["valid"]["users"] == USERS
    assert 0 < saved["test"]["hr@200"] <= 1 and saved["test"]["ndcg@10"] <= saved["test"]["hr@10"]
    assert (run / json.loads((run / "best.json").read_text())["checkpoint"] / "trainer_state.json").is_file()
