"""The loader on real MovieLens-100K: exactly once across ranks, KJT contents against the Parquet rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from trec_rank.config.experiment import load_config
from trec_rank.data.dataset import ParquetDataset

ROOT = Path(__file__).resolve().parents[1]


WORKERS = """
import json, sys
from trec_rank.config.experiment import load_config
from trec_rank.data.dataset import ParquetDataset
cfg = load_config(sys.argv[1])
seen = []
for rank in range(2):
    ds = ParquetDataset(sys.argv[2], cfg.schema, 256, rank=rank, world_size=2, shuffle=True, seed=7, num_workers=2)
    seen += [int(r) for b in ds.batches(epoch=3) for r in b.row_index]
print(json.dumps(seen))
"""


def test_ml100k_every_row_once_across_two_ranks_with_workers(ml100k_dir: Path) -> None:
    """In a fresh interpreter: DataLoader workers forked by this test process, after other tests created and
    destroyed gloo groups in it, once deadlocked (a fork copies whatever locks those threads held)."""
    path = ml100k_dir / "ranking" / "train"
    proc = subprocess.run([sys.executable, "-c", WORKERS, str(ROOT / "configs" / "ml100k_base.yaml"), str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    seen = json.loads(proc.stdout.splitlines()[-1])
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in path.glob("*.parquet"))
    assert sorted(seen) == list(range(total))


def test_ml100k_batch_matches_rows(ml100k_dir: Path) -> None:
    cfg = load_config(ROOT / "configs" / "ml100k_base.yaml")
    path = ml100k_dir / "ranking" / "valid"
    table = pq.read_table(path)
    rows = table.to_pylist()
    batch = next(ParquetDataset(path, cfg.schema, 64, shuffle=True, seed=1).batches())
    idx = batch.row_index.tolist()
    for name in ("hist_item_id", "hist_genre", "pos_item_id", "item_id", "genres"):
        jt = batch.sequence[name]
        expected = [rows[i][name] if isinstance(rows[i][name], list) else [rows[i][name]] for i in idx]
        assert jt.lengths().tolist() == [len(e) for e in expected]
        assert jt.values().tolist() == [v for e in expected for v in e]
    assert batch.sparse["user_id"].values().tolist() == [rows[i]["user_id"] for i in idx]
    assert batch.side["hist_item_id/timestamp"].tolist() == [t for i in idx for t in rows[i]["hist_ts"]]
    assert batch.labels["like"].tolist() == [rows[i]["like"] for i in idx]
    assert batch.dense[:, 1].tolist() == [rows[i]["hist_mean_rating"] for i in idx]
    for i in idx:  # no history event at or after the rated one
        assert all(t < rows[i]["timestamp"] for t in rows[i]["hist_ts"])
