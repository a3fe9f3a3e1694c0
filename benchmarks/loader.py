"""Loader throughput: Parquet -> Batch rows/s, against the training throughput of the base model.

    .venv/bin/python benchmarks/loader.py [--rows 300000] [--data data/ml-100k]

Measures, single process, for MovieLens-100K `ranking/` (history 50, 4 sequence features) and a
synthetic DLRM-shaped dataset (26 sparse + 13 dense): loader rows/s and batches/s with 0 and 2
workers, and one training step's rows/s of the base model (unsharded, same batch) measured in the
same run. The last column is loader / training: the loader must never be the bottleneck (>= 10x).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from trec_rank.config.experiment import load_config
from trec_rank.data.dataset import ParquetDataset
from trec_rank.data.prepare.movielens import prepare_movielens
from trec_rank.data.prepare.synthetic import prepare_synthetic
from trec_rank.models.embeddings import materialize
from trec_rank.models.ranking import TrainWrapper
from trec_rank.models.registry import build_model

ROOT = Path(__file__).resolve().parents[1]


def loader_rate(path: Path, cfg, workers: int) -> tuple[float, float]:  # noqa: ANN001
    ds = ParquetDataset(path, cfg.schema, cfg.data.batch_size, shuffle=True, num_workers=workers, validate="schema")
    t0, rows, batches = time.perf_counter(), 0, 0
    for b in ds.batches():
        rows += b.batch_size
        batches += 1
    dt = time.perf_counter() - t0
    return rows / dt, batches / dt


def train_rate(path: Path, cfg, steps: int = 30) -> float:  # noqa: ANN001
    torch.manual_seed(0)
    model = materialize(TrainWrapper(build_model(cfg, torch.device("meta")), cfg.model.tasks, {}), torch.device("cpu"))
    opt = torch.optim.Adagrad(model.parameters(), lr=0.01)
    batches = []
    for b in ParquetDataset(path, cfg.schema, cfg.data.batch_size, validate="schema").batches():
        batches.append(b)
        if len(batches) == steps + 5:
            break
    for i, b in enumerate(batches):
        if i == 5:
            t0 = time.perf_counter()
        loss, _ = model(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (len(batches) - 5) * cfg.data.batch_size / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=300_000, help="synthetic rows")
    p.add_argument("--data", default=str(ROOT / "data" / "ml-100k"), help="prepared ml-100k root (made if absent)")
    args = p.parse_args()
    torch.set_num_threads(2)
    ml = Path(args.data)
    if not (ml / "ranking" / "train").is_dir():
        prepare_movielens("ml-100k", ml)
    ml_cfg = load_config(ROOT / "configs" / "ml100k_base.yaml")
    syn_cfg = load_config(ROOT / "configs" / "synthetic_dlrm.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        prepare_synthetic(syn_cfg.schema, args.rows, Path(tmp))
        cases = [("ml-100k ranking/ (hist 50)", ml / "ranking" / "train", ml_cfg),
                 (f"synthetic 26 sparse ({args.rows:,} rows)", Path(tmp) / "train", syn_cfg)]
        print(f"{'dataset':34} {'batch':>6} {'workers':>7} {'rows/s':>10} {'batches/s':>9} "
              f"{'train rows/s':>12} {'loader/train':>12}")
        for name, path, cfg in cases:
            train = train_rate(path, cfg)
            for workers in (0, 2):
                rows, batches = loader_rate(path, cfg, workers)
                print(f"{name:34} {cfg.data.batch_size:>6} {workers:>7} {rows:>10,.0f} {batches:>9,.1f} "
                      f"{train:>12,.0f} {rows / train:>11.1f}x")


if __name__ == "__main__":
    main()
