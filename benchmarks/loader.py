"""Loader throughput: Parquet -> Batch rows/s, against what the real trainer consumes, same run.

    .venv/bin/python benchmarks/loader.py [--rows 300000] [--data data] [--steps 150] [--threads 2] [--repeat 3]

For each case: the loader's rows/s (`ParquetDataset.batches`, 0 and 2 workers), and the
training rows/s of the real one-rank trainer (`trec-rank train`: DMP, fused tables, its loop, this
loader) over --steps steps on the same data and config (`throughput.json`: start-up, eval and
checkpoints left out). The last column is loader / trainer: the loader must never be the bottleneck
(issue 18: >= 5x).
  ml-100k base       configs/ml100k_base.yaml (history 50, 4 sequence features), batch 256
  ml-100k DIN        benchmarks/configs/din_peers.yaml (the peers benchmark's DIN), batch 256
  adult MMoE         benchmarks/configs/mmoe.yaml (the peers benchmark's MMoE), batch 256
  synthetic DLRM     configs/synthetic_dlrm.yaml (26 sparse + 13 dense, --rows rows), batch 2048
Data under --data is prepared when absent (ml-100k/, adult/; the synthetic rows in a temp dir).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from intervals import ratio
from trec_cli import train

from trec_rank.config.experiment import ExperimentConfig, load_config
from trec_rank.data.dataset import ParquetDataset
from trec_rank.data.prepare.adult import prepare_adult
from trec_rank.data.prepare.movielens import prepare_movielens
from trec_rank.data.prepare.synthetic import prepare_synthetic

ROOT = Path(__file__).resolve().parents[1]


def loader_rate(cfg: ExperimentConfig, workers: int) -> float:
    """Rows/s of one pass over the train split (shuffled, as training reads it)."""
    ds = ParquetDataset(cfg.data.split_path("train"), cfg.schema, cfg.data.batch_size, shuffle=True,
                        num_workers=workers, validate="schema")
    t0, rows = time.perf_counter(), 0
    for b in ds.batches():
        rows += b.batch_size
    return rows / (time.perf_counter() - t0)


def trainer_rate(config: Path, data: Path, batch: int, steps: int, threads: int) -> float:
    """Rows/s of the real one-rank trainer (`trec-rank train`'s throughput.json), in its own process."""
    sets = [f"data.path={data}", f"data.batch_size={batch}", f"train.max_steps={steps}", "train.epochs=1000",
            "data.eval_splits=[]", "train.checkpoint_every=1000000", "train.log_every=1000000"]
    with tempfile.TemporaryDirectory() as run:
        return train(config, sets, Path(run), threads=threads)["samples_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=300_000, help="synthetic rows")
    p.add_argument("--data", default=str(ROOT / "data"), help="root of ml-100k/ and adult/ (prepared if absent)")
    p.add_argument("--steps", type=int, default=150, help="trainer steps per case")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (the peers benchmark's 2)")
    p.add_argument("--repeat", type=int, default=3, help="repetitions of every case (trainer, then loader)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    if not (data / "ml-100k" / "ranking" / "train").is_dir():
        prepare_movielens("ml-100k", data / "ml-100k")
    if not (data / "adult" / "adult" / "train").is_dir():
        prepare_adult(data / "adult")
    with tempfile.TemporaryDirectory() as tmp:
        syn = load_config(ROOT / "configs" / "synthetic_dlrm.yaml")
        prepare_synthetic(syn.schema, args.rows, Path(tmp))
        cases = [("ml-100k base", "configs/ml100k_base.yaml", data / "ml-100k" / "ranking", 256),
                 ("ml-100k DIN", "benchmarks/configs/din_peers.yaml", data / "ml-100k" / "ranking", 256),
                 ("adult MMoE", "benchmarks/configs/mmoe.yaml", data / "adult" / "adult", 256),
                 (f"synthetic DLRM ({args.rows:,} rows)", "configs/synthetic_dlrm.yaml", Path(tmp), 2048)]
        print(f"{'case':30} {'batch':>6} {'workers':>7} {'rows/s':>10} {'trainer rows/s':>14} "
              f"{'loader / trainer, 95% CI':>26}", flush=True)
        for name, config, path, batch in cases:
            cfg = load_config(ROOT / config, [f"data.path={path}", f"data.batch_size={batch}"])
            trains, loads = [], {0: [], 2: []}
            for _ in range(args.repeat):  # the trainer and the loader back to back: the same machine state
                trains.append(trainer_rate(ROOT / config, path, batch, args.steps, args.threads))
                for workers, rates in loads.items():
                    rates.append(loader_rate(cfg, workers))
            for workers, rates in loads.items():
                share = ratio([r / t for r, t in zip(rates, trains, strict=True)])
                print(f"{name:30} {batch:>6} {workers:>7} {statistics.median(rates):>10,.0f} "
                      f"{statistics.median(trains):>14,.0f} {share:>26}", flush=True)
        print(f"{args.repeat} repetition(s): rates are medians; loader / trainer is the geometric mean of the "
              "per-repetition ratios with its 95% t-interval (benchmarks/intervals.py)")


if __name__ == "__main__":
    main()
