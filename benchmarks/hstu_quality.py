"""HSTU vs SASRec retrieval (same table, loss, negatives, protocol and budget), plus HSTU vs base for ranking.

Each retrieval run is `python -m trec_rank.cli train` in its own process, one after another
(so runs do not compete for the cores), with the same epochs / patience / seeds for both encoders;
the script reads each run's metrics.json (test at the best validation epoch) and prints one
markdown table. `--step-time` adds a train-step micro-benchmark of both encoders (one process, no
sharding); `--ranking-steps N` trains configs/ml100k_base.yaml and configs/ml100k_hstu_ranking.yaml
for N steps each through the ranking Trainer and reports valid like/auc.

    .venv/bin/python benchmarks/hstu_quality.py --epochs 40 --patience 5 --seeds 0 1 --step-time --ranking-steps 600
    .venv/bin/python benchmarks/hstu_quality.py --configs configs/ml1m_hstu.yaml configs/ml1m_sasrec.yaml --epochs 101

(The encoder speed benchmark, jagged vs padded at the issue's shape, is benchmarks/hstu.py.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ["hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr"]


def retrieval_run(config: str, seed: int, args: argparse.Namespace) -> dict:
    name = f"{Path(config).stem}-seed{seed}"
    run_dir = Path(args.out) / name
    if args.reuse and (run_dir / "metrics.json").is_file():
        # a finished run: its wall time is the span from config.json (start) to metrics.json (end)
        wall = (run_dir / "metrics.json").stat().st_mtime - (run_dir / "config.json").stat().st_mtime
        return summarize(name, config, seed, run_dir, wall, float("nan"), "file mtimes (reused run)")
    sets = [f"train.epochs={args.epochs}", f"train.patience={args.patience}", f"train.seed={seed}",
            f"data.seed={seed}", *args.set]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    cmd = [sys.executable, *(launcher if args.nproc > 1 else []), "-m", "trec_rank.cli", "train", config,
           "--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return summarize(name, config, seed, run_dir, wall, load0, "measured")


def summarize(name: str, config: str, seed: int, run_dir: Path, wall: float, load: float, wall_source: str) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = json.loads((run_dir / "best.json").read_text())
    history = [json.loads(line) for line in (run_dir / "metrics_history.jsonl").read_text().splitlines()]
    return {"name": name, "config": config, "seed": seed, "wall_s": wall, "wall_source": wall_source,
            "load_avg_start": load, "epochs_run": history[-1]["epoch"], "best_epoch": best["epoch"],
            "valid": metrics["valid"], "test": metrics["test"], "history": history}


def step_times(configs: list[str], threads: int, rounds: int = 3, steps: int = 4) -> list[dict]:
    """Median wall and CPU seconds of one training step (forward + backward + AdamW), unsharded model.

    The encoders are measured in alternation for `rounds` rounds, so a load change on a shared
    machine hits both; CPU time (all threads) is the steadier number there.
    """
    import torch

    from trec_rank.models.embeddings import materialize
    from trec_rank.retrieval.batch import NegativeSampler, train_batch
    from trec_rank.retrieval.config import load_retrieval_config
    from trec_rank.retrieval.data import SplitReader, read_sequences
    from trec_rank.retrieval.model import build_retrieval_model
    from trec_rank.retrieval.trainer import data_path

    torch.set_num_threads(threads)
    setups = []
    for config in configs:
        cfg = load_retrieval_config(config)
        seqs = read_sequences(data_path(cfg), cfg.data.items_column, cfg.data.time_column, cfg.item.num_embeddings)
        sampler = NegativeSampler(seqs.corpus(), cfg.loss.num_negatives, cfg.loss.sampler, cfg.item.num_embeddings, 0)
        _, window = next(SplitReader(seqs, "train", cfg, cfg.data.batch_size, 0, 1, shuffle=True).batches(0))
        model = materialize(build_retrieval_model(cfg), torch.device("cpu")).train()
        setups.append((model, torch.optim.AdamW(model.parameters(), lr=1e-3), train_batch(window, sampler, 0, 0, 0)))
    wall: list[list[float]] = [[] for _ in configs]
    cpu: list[list[float]] = [[] for _ in configs]
    for _ in range(rounds):
        for k, (model, opt, batch) in enumerate(setups):
            for step in range(steps + 1):  # the first step of each round warms up
                t0, c0 = time.perf_counter(), time.process_time()
                loss, _ = model(batch)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step:
                    wall[k].append(time.perf_counter() - t0)
                    cpu[k].append(time.process_time() - c0)
    return [{"config": c, "threads": threads, "median_step_s": statistics.median(w),
             "median_cpu_s": statistics.median(u), "positions_per_step": int(setups[k][2].neg_index.shape[0])}
            for k, (c, w, u) in enumerate(zip(configs, wall, cpu))]


def popularity(config: str, split: str = "test") -> dict:
    """Most-popular-first (train-portion counts), same protocol and tie rule: the floor any encoder must beat."""
    import numpy as np
    import torch

    from trec_rank.retrieval.config import load_retrieval_config
    from trec_rank.retrieval.data import SplitReader, read_sequences
    from trec_rank.retrieval.metrics import RankingMetrics, target_ranks
    from trec_rank.retrieval.trainer import data_path

    cfg = load_retrieval_config(config)
    seqs = read_sequences(data_path(cfg), cfg.data.items_column, cfg.data.time_column, cfg.item.num_embeddings)
    position = np.arange(len(seqs.items)) - np.repeat(seqs.offsets[:-1], seqs.lengths)
    in_train = position < np.repeat(seqs.lengths - 2, seqs.lengths)  # before each user's valid item
    counts = np.bincount(seqs.items[in_train], minlength=cfg.item.num_embeddings).astype(np.float64)
    corpus = seqs.corpus()
    column = np.full(cfg.item.num_embeddings, -1)
    column[corpus] = np.arange(len(corpus))
    scores = torch.from_numpy(counts[corpus])
    metrics = RankingMetrics(cfg.eval.ks, torch.device("cpu"))
    for _, w in SplitReader(seqs, split, cfg, 512, 0, 1, shuffle=False).batches():
        last = np.cumsum(w.lengths) - 1
        seen = np.ones(len(w.items), dtype=bool)
        seen[last] = False
        rows = np.repeat(np.arange(len(w.lengths)), w.lengths)
        ranks = target_ranks(scores.expand(len(w.lengths), -1), torch.from_numpy(column[w.items[last]]),
                             torch.from_numpy(rows[seen]), torch.from_numpy(column[w.items[seen]]))
        metrics.update(ranks, torch.full((len(w.lengths),), w.weight))
    return metrics.compute()


def ranking_runs(steps: int, out: Path) -> list[dict]:
    """base vs the HSTU over-arch on ml-100k ranking, the same number of steps, through the ranking Trainer."""
    from trec_rank.config.experiment import load_config
    from trec_rank.parallel.env import init_distributed, shutdown
    from trec_rank.train.loop import Trainer

    results = []
    for config in ("configs/ml100k_base.yaml", "configs/ml100k_hstu_ranking.yaml"):
        cfg = load_config(ROOT / config, [f"train.max_steps={steps}", "train.epochs=50", "data.eval_splits=[valid]",
                                          f"data.path={ROOT / 'data/ml-100k/ranking'}"])
        env = init_distributed("cpu")
        t0 = time.perf_counter()
        try:
            valid = Trainer(cfg, env, out / Path(config).stem).fit()["valid"]
        finally:
            shutdown()
        results.append({"config": config, "steps": steps, "wall_s": time.perf_counter() - t0,
                        "valid_auc": valid["like/auc"], "valid_gauc": valid.get("like/gauc", float("nan"))})
    return results


def table(runs: list[dict]) -> str:
    head = "| run | best epoch / run | " + " | ".join(f"test {m}" for m in METRICS) + " | valid ndcg@10 | wall s |"
    lines = [head, "|" + "---|" * (len(METRICS) + 4)]
    for r in runs:
        cells = " | ".join(f"{r['test'][m]:.4f}" for m in METRICS)
        lines.append(f"| {r['name']} | {r['best_epoch']} / {r['epochs_run']} | {cells} | "
                     f"{r['valid']['ndcg@10']:.4f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["configs/ml100k_hstu.yaml", "configs/ml100k_sasrec.yaml"])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--set", action="append", default=[], help="extra override for every retrieval run")
    p.add_argument("--threads", type=int, default=2, help="OMP threads per process")
    p.add_argument("--nproc", type=int, default=1, help="ranks per retrieval run (torchrun)")
    p.add_argument("--step-time", action="store_true")
    p.add_argument("--ranking-steps", type=int, default=0)
    p.add_argument("--out", default="runs/bench-hstu")
    p.add_argument("--reuse", action="store_true", help="read finished runs in --out instead of rerunning them")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"args": vars(args), "retrieval": [], "popularity": popularity(args.configs[0])}
    save = lambda: (out / "results.json").write_text(json.dumps(report, indent=1))  # noqa: E731 - after each stage
    for config in args.configs:
        for seed in args.seeds:
            report["retrieval"].append(retrieval_run(config, seed, args))
            save()
            print(f"done {report['retrieval'][-1]['name']}", flush=True)
    if args.step_time:
        report["step_time"] = step_times(args.configs, args.threads)
        save()
    if args.ranking_steps:
        report["ranking"] = ranking_runs(args.ranking_steps, out)
        save()
    print(table(report["retrieval"]))
    pop = report["popularity"]
    print("| popularity (test) | - | " + " | ".join(f"{pop[m]:.4f}" for m in METRICS) + " | - | - |")
    for s in report.get("step_time", []):
        print(f"step time {s['config']}: {s['median_step_s']:.3f} s wall, {s['median_cpu_s']:.3f} s CPU "
              f"({s['positions_per_step']} positions, {s['threads']} threads)")
    for r in report.get("ranking", []):
        print(f"ranking {r['config']}: valid like/auc {r['valid_auc']:.4f} gauc {r['valid_gauc']:.4f} "
              f"after {r['steps']} steps ({r['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
