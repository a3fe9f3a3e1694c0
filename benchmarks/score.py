"""Batch scoring throughput vs training throughput of the same model, 1 and 2 processes, with memory.

    .venv/bin/python benchmarks/score.py [--data data/ml-100k] [--rows 1000000] [--models base,din]
                                         [--procs 1,2] [--variants unsharded,sharded,int8] [--repeat 3]
                                         [--work DIR]

For each model (base, and DIN when configs/ml100k_din.yaml exists): trains it through the real CLI
for --train-steps steps on 1 and on 2 processes (rows/s between the trainer's first and last
TensorBoard points: steady state, without start-up, eval or checkpointing), then scores ml-100k
`ranking/train` replicated (symlinked file copies) to >= --rows rows with the longer run's checkpoint
through `trec-rank score`. Scoring rows/s is the scoring phase from the summary line (model loaded,
data opened); the end-to-end column includes interpreter start, data validation and model load.
RSS is rank 0's resident memory at the start, middle and end of the scoring loop (_SUCCESS
manifest): flat from middle to end means memory does not grow with the rows scored.
Each (training run, scoring of its checkpoint) pair repeats --repeat times; score / train is the geometric
mean of the per-repetition ratios with its 95% interval (benchmarks/intervals.py).
Target: scoring >= 2x training rows/s at the same process count.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
from intervals import ratio
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from trec_cli import run_cli, set_args

from trec_rank.config.experiment import load_config

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"score: rows_in=(\d+) rows_out=(\d+) scored=(\d+) seconds=([\d.]+) rows_per_s=(\d+)")


def replicate(split: Path, rows: int, out: Path) -> int:
    """Symlink the split's files `copies` times so the input has >= rows rows; returns the row count."""
    files = sorted(split.glob("*.parquet"))
    per_copy = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    copies = math.ceil(rows / per_copy)
    out.mkdir(parents=True, exist_ok=True)
    for c in range(copies):
        for f in files:
            link = out / f"copy{c:03d}-{f.name}"
            if not link.exists():
                link.symlink_to(f.resolve())
    return copies * per_copy


def train_rate(config: str, data: Path, work: Path, nproc: int, steps: int, rep: int) -> tuple[float, Path]:
    """Steady-state training rows/s of one `steps`-step run, from the wall times of the trainer's own
    TensorBoard points (every steps/4 steps): start-up, the final eval and the checkpoint are excluded."""
    batch = load_config(ROOT / config).data.batch_size
    run = work / f"train-{Path(config).stem}-{nproc}p-r{rep}"
    sets = [f"data.path={data}/ranking", f"train.max_steps={steps}", "train.epochs=100",
            f"train.log_every={steps // 4}", "train.eval_every=1000000", "train.checkpoint_every=1000000"]
    run_cli(["train", config, "--run-dir", str(run), *set_args(sets)], nproc=nproc)
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    points = acc.Scalars("train/samples_per_s")
    first, last = points[0], points[-1]
    return (last.step - first.step) * batch * nproc / (last.wall_time - first.wall_time), run


def score_rate(config: str, ckpt: Path, data: Path, out: Path, nproc: int, variant: str) -> dict:
    extra = {"unsharded": [], "sharded": ["--sharded"], "int8": ["--quantize", "int8"]}[variant]
    stdout, wall = run_cli(["score", config, "--checkpoint", str(ckpt), "--input", str(data), "--output", str(out),
                            *extra], nproc=nproc)
    m = SUMMARY.search(stdout)
    if not m:
        raise SystemExit(f"no summary line in:\n{stdout[-2000:]}")
    rows_in, rows_out, scored = int(m.group(1)), int(m.group(2)), int(m.group(3))
    assert rows_in == rows_out == scored, (rows_in, rows_out, scored)
    manifest = json.loads((out / "_SUCCESS").read_text())
    return {"rows": rows_out, "rate": float(m.group(5)), "e2e": rows_out / wall,
            "rss": manifest["last_run"]["rss_mb"][0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "data" / "ml-100k"), help="prepared ml-100k root")
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows to score (ranking/train replicated)")
    ap.add_argument("--models", default="base,din", help="configs/ml100k_<model>.yaml (skipped when missing)")
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--variants", default="unsharded", help="unsharded,sharded,int8 (sharded needs >= 2 procs)")
    ap.add_argument("--train-steps", type=int, default=200, help="training steps per measurement run")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions (a training run, then its scoring)")
    ap.add_argument("--work", help="working directory (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="score-bench-"))
    data = Path(args.data).resolve()
    n_rows = replicate(data / "ranking" / "train", args.rows, work / "input")
    print(f"input: {n_rows:,} rows ({data}/ranking/train replicated) in {work / 'input'}", flush=True)
    table = []
    for model in args.models.split(","):
        config = f"configs/ml100k_{model}.yaml"
        if not (ROOT / config).is_file():
            print(f"{config}: not found, skipped")
            continue
        for nproc in (int(p) for p in args.procs.split(",")):
            variants = [v for v in args.variants.split(",") if v != "sharded" or nproc >= 2]
            trains, scores = [], {v: [] for v in variants}
            for rep in range(args.repeat):  # training, then scoring its checkpoint: the same machine state
                train, run = train_rate(config, data, work, nproc, args.train_steps, rep)
                trains.append(train)
                for variant in variants:
                    out = work / f"scores-{model}-{nproc}p-{variant}-r{rep}"
                    scores[variant].append(score_rate(config, run, work / "input", out, nproc, variant))
                    print(f"{model} {nproc}p {variant} rep {rep}: train {train:,.0f} rows/s, score "
                          f"{scores[variant][-1]['rate']:,.0f} rows/s", flush=True)
            table += [(model, nproc, v, trains, scores[v]) for v in variants]
    head = (f"{'model':<6} {'procs':>5} {'variant':<9} {'rows':>9} {'train rows/s':>12} {'score rows/s':>12} "
            f"{'score / train, 95% CI':>22} {'e2e rows/s':>10} {'RSS MB start/mid/end (rank 0)':>30}")
    print("\n" + head + "\n" + "-" * len(head))
    for model, nproc, variant, trains, rs in table:
        last = rs[-1]
        rss = "/".join(f"{last['rss'][k]:.0f}" for k in ("start", "middle", "end"))
        gain = ratio([r["rate"] / t for r, t in zip(rs, trains, strict=True)])
        print(f"{model:<6} {nproc:>5} {variant:<9} {last['rows']:>9,} {statistics.median(trains):>12,.0f} "
              f"{statistics.median(r['rate'] for r in rs):>12,.0f} {gain:>22} "
              f"{statistics.median(r['e2e'] for r in rs):>10,.0f} {rss:>30}")
    print(f"{args.repeat} repetition(s): rates are medians; score / train is the geometric mean of the "
          "per-repetition ratios with its 95% t-interval; RSS from the last repetition")


if __name__ == "__main__":
    main()
