"""The 2 x 2 of issue 20: SASRec / HSTU x without / with actions (ratings as history tokens), N seeds each.

Trains every (variant, seed) through the CLI (`trec-rank train CONFIG --set train.seed=S --set
data.seed=S`), skipping runs whose metrics.json exists (so a stopped grid resumes), then prints
the table (test NDCG@10, HR@10, MRR as mean +- sd over seeds, time per epoch) and the paired
intervals of `trec-rank compare` (users and seeds resampled) for the comparisons that matter:
actions vs none within each encoder, HSTU vs SASRec without actions, and action-aware HSTU
against the SASRec variant with the better *validation* NDCG@10 (chosen on valid, never on test).

    .venv/bin/python benchmarks/actions_2x2.py --seeds 0 1 2 --out runs/actions2x2 [--jobs 2] [--set train.epochs=2]

Time per epoch is the run's wall time (start-up and the per-epoch full-corpus evaluation included)
over the epochs it ran; runs in parallel (`--jobs`) share the CPU, so compare times within one grid.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"sasrec": "configs/ml100k_sasrec.yaml", "sasrec+actions": "configs/ml100k_sasrec_actions.yaml",
            "hstu": "configs/ml100k_hstu.yaml", "hstu+actions": "configs/ml100k_hstu_actions.yaml"}
METRICS = ["ndcg@10", "hr@10", "mrr"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trec_rank.cli", *args], cwd=ROOT, capture_output=True, text=True)


def train(run: Path, config: str, seed: int, sets: list[str]) -> None:
    """One run, unless it finished before; its wall time goes to RUN/wall.json."""
    if (run / "metrics.json").is_file():
        return
    extra = [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    proc = cli("train", config, "--run-dir", str(run), "--set", f"train.seed={seed}", "--set", f"data.seed={seed}",
               *extra)
    if proc.returncode:
        raise RuntimeError(f"{run}: trec-rank train exited {proc.returncode}\n{proc.stderr[-3000:]}")
    (run / "wall.json").write_text(json.dumps({"seconds": time.perf_counter() - t0}))


def summary(runs: list[Path]) -> dict[str, str | float]:
    """mean +- sd over seeds of the test metrics, valid NDCG@10 mean, seconds per epoch."""
    metrics = [json.loads((r / "metrics.json").read_text()) for r in runs]
    epochs = [len((r / "metrics_history.jsonl").read_text().splitlines()) for r in runs]
    # a run resumed after a stop has no wall.json: its time per epoch is unknown, so it is left out
    walls = [json.loads((r / "wall.json").read_text())["seconds"] if (r / "wall.json").is_file() else None
             for r in runs]
    out: dict[str, str | float] = {}
    for m in METRICS:
        vals = [x["test"][m] for x in metrics]
        sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        out[m] = f"{statistics.mean(vals):.4f} +- {sd:.4f}"
    out["valid"] = statistics.mean(x["valid"]["ndcg@10"] for x in metrics)
    timed = [w / e for w, e in zip(walls, epochs, strict=True) if w is not None]
    out["s/epoch"] = f"{statistics.mean(timed):.1f} ({len(timed)} runs)" if timed else "—"
    return out


def paired(a: list[Path], b: list[Path], out: Path, metrics: list[str] = METRICS) -> dict:
    proc = cli("compare", "--a", *map(str, a), "--b", *map(str, b), "--metrics", ",".join(metrics), "--json",
               str(out))
    if proc.returncode:
        raise RuntimeError(f"trec-rank compare exited {proc.returncode}: {proc.stderr.strip()}")
    return json.loads(out.read_text())["metrics"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("runs/actions2x2"))
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (each is one process)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    args = p.parse_args()
    runs = {v: [args.out / f"{v.replace('+', '_')}-s{s}" for s in args.seeds] for v in VARIANTS}
    with ThreadPoolExecutor(args.jobs) as pool:
        jobs = [pool.submit(train, run, VARIANTS[v], s, args.set)
                for v in VARIANTS for run, s in zip(runs[v], args.seeds, strict=True)]
        for j in jobs:
            j.result()
    rows = {v: summary(r) for v, r in runs.items()}
    print(f"ml-100k, seeds {args.seeds}, test at the best valid NDCG@10 epoch; mean +- sd over seeds"
          + (f"; overrides {' '.join(args.set)}" if args.set else "") + "\n")
    print("| variant | test NDCG@10 | test HR@10 | test MRR | valid NDCG@10 | s / epoch |\n|---|---|---|---|---|---|")
    for v, r in rows.items():
        print(f"| {v} | {r['ndcg@10']} | {r['hr@10']} | {r['mrr']} | {r['valid']:.4f} | {r['s/epoch']} |")
    best_sasrec = max(("sasrec", "sasrec+actions"), key=lambda v: rows[v]["valid"])
    pairs = [("hstu+actions", "hstu"), ("sasrec+actions", "sasrec"), ("hstu", "sasrec"),
             ("hstu+actions", best_sasrec)]
    print(f"\npaired 95% intervals of A - B on test (trec-rank compare: seeds {args.seeds} and users resampled; "
          f"best SASRec variant on valid: {best_sasrec})\n")
    print("| A | B | " + " | ".join(f"{m}: A - B [95%]" for m in METRICS) + " |\n|---|---|" + "---|" * len(METRICS))
    for a, b in pairs:
        res = paired(runs[a], runs[b], args.out / f"compare-{a}-vs-{b}.json".replace("+", "_"))
        cells = [f"{res[m]['diff']:+.4f} [{res[m]['low']:+.4f}, {res[m]['high']:+.4f}]"
                 + (" *" if res[m]["low"] > 0 or res[m]["high"] < 0 else "") for m in METRICS]
        print(f"| {a} | {b} | " + " | ".join(cells) + " |")
    print("\n* = the interval excludes 0")


if __name__ == "__main__":
    main()
