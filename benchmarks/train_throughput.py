"""Training throughput (samples/s) of the base model, DIN and MMoE through the real trainer.

    .venv/bin/python benchmarks/train_throughput.py [--data data] [--steps 200] [--models base,din,din-l2off,mmoe]
        [--baseline REV]  # also run every row on the code of git revision REV: before/after in one run
        [--repeat N]      # N alternating measurements per row, the best (least disturbed) reported
        [--base-sizes]    # also the base model at batch 4096 and on 2 processes (the earlier table)
        [--threads N]     # intra-op threads per process (OMP_NUM_THREADS; default 1)

Every row runs the real CLI in its own process (`trec-rank train`, under torch.distributed.run for
2 processes; benchmarks/trec_cli.py: DMP + planner, fused row-wise Adagrad tables, Adam dense
optimizer, the trainer's loop, Parquet loader, gloo on CPU) with evaluation and checkpoints pushed
out of the measured window, and reads RUN_DIR/throughput.json (samples/s over the training steps
only). Shapes follow issue 4:

  base: configs/ml100k_base.yaml, every table dim 16, history 50.
  din:  benchmarks/configs/din.yaml (ml100k_din-style: Dice, mini-batch-aware L2), every
        table dim 16, history 50, attention unit [64, 32], top MLP [200, 80].
  din-l2off: the same without the mini-batch-aware L2 (plain DIN, what peer numbers usually are).
  mmoe: benchmarks/configs/mmoe.yaml (adult_mmoe-style), emb 8, 4 experts [64], towers [32],
        12 sparse + 6 dense features, 2 tasks.
The DIN/MMoE configs are pinned under benchmarks/configs/ so that --baseline runs (which use the
revision's code but always this checkout's config files) train exactly the same model.

All at batch 256, one process, OMP_NUM_THREADS=1 unless --threads (the machine is shared; wall
times move with the load, so compare rows of one run). "vs peer" divides by the fastest peer number the issue
quotes at batch 256 (DIN 6.6k, multi-task towers 53k samples/s); the target is 3x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from intervals import ratio
from trec_cli import train

ROOT = Path(__file__).resolve().parents[1]
PEER = {"din": 6_600.0, "din-l2off": 6_600.0, "mmoe": 53_000.0}  # fastest peer at batch 256 (issue 4)
TARGET_X = 3.0


def dims(n: int, dim: int) -> list[str]:
    return [f"schema.tables.{i}.embedding_dim={dim}" for i in range(n)]


MODELS = {  # name -> (config under ROOT, data under --data, overrides, embedding dim)
    "base": ("configs/ml100k_base.yaml", "ml-100k/ranking", [*dims(7, 16)], 16),
    "din": ("benchmarks/configs/din.yaml", "ml-100k/ranking", [], 16),
    "din-l2off": ("benchmarks/configs/din.yaml", "ml-100k/ranking", ["model.params.encoder.l2.weight=0"], 16),
    "mmoe": ("benchmarks/configs/mmoe.yaml", "adult/adult", [], 8),
}


def export_revision(rev: str, dest: Path) -> None:
    """Git revision `rev`'s files under `dest` (git archive: no worktree, no change to this checkout)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)


def run(model: str, data: Path, nproc: int, batch: int, steps: int, run_dir: Path, code: Path = ROOT,
        threads: int = 1) -> dict:
    config, subdir, sets, _ = MODELS[model]
    sets = [*sets, f"data.path={data / subdir}", f"data.batch_size={batch}", f"train.max_steps={steps}",
            "data.eval_splits=[]", "train.checkpoint_every=1000000", "train.epochs=1000",
            "train.log_every=1000000"]
    return train(ROOT / config, sets, run_dir, threads=threads, nproc=nproc, code=code)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "data"), help="root holding ml-100k/ and adult/ (trec-rank data)")
    p.add_argument("--steps", type=int, default=200, help="training steps per measurement at batch 256")
    p.add_argument("--models", default="base,din,din-l2off,mmoe", help="comma-separated subset of "
                   "base,din,din-l2off,mmoe")
    p.add_argument("--baseline", default="", help="git revision to measure too (its trec_rank, same venv)")
    p.add_argument("--repeat", type=int, default=1, help="measure every row this many times; report the best")
    p.add_argument("--base-sizes", action="store_true", help="also base at batch 4096 and on 2 processes")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process (OMP_NUM_THREADS)")
    args = p.parse_args()
    data = Path(args.data)
    for name in ("ml-100k", "adult"):
        if not (data / name).is_dir():
            subprocess.run([sys.executable, "-m", "trec_rank.cli", "data", name, "--out", str(data / name)],
                           cwd=ROOT, check=True)
    cases = [(m, 256, 1) for m in args.models.split(",")]
    if args.base_sizes:
        cases += [("base", 256, 2), ("base", 4096, 1), ("base", 4096, 2)]
    cases = [(m, batch, nproc, args.steps if batch == 256 else max(8, args.steps // 8)) for m, batch, nproc in cases]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "baseline"
        if args.baseline:
            export_revision(args.baseline, before)
        rates: dict[tuple, tuple[list[float], list[float]]] = {case: ([], []) for case in cases}
        floors: list[dict[str, float]] = []  # the eager floor, once per repetition (paired with its rows)
        for rep in range(args.repeat):
            for case in cases:
                model, batch, nproc, steps = case
                name = f"{model}-b{batch}-p{nproc}-r{rep}"
                if args.baseline:  # alternate old/new so both see the same machine load
                    rates[case][1].append(run(model, data, nproc, batch, steps, Path(tmp) / f"old-{name}",
                                              before, args.threads)["samples_per_s"])
                rates[case][0].append(run(model, data, nproc, batch, steps, Path(tmp) / name, ROOT,
                                          args.threads)["samples_per_s"])
            floors.append(eager_floor(args.threads))
        for (model, batch, nproc, steps), (new, old) in rates.items():
            rows.append((model, batch, nproc, steps, max(new), old and max(old)))
    print(f"{'model':9} {'emb':>4} {'batch':>6} {'procs':>5} {'steps':>5} {'samples/s':>10} {'ms/step':>8} "
          f"{'before':>9} {'speed-up':>8} {'vs peer':>8} {'target':>9}")
    for model, batch, nproc, steps, rate, old in rows:
        vs_peer = f"{rate / PEER[model]:.2f}x" if model in PEER and batch == 256 else "-"
        target = f"{TARGET_X * PEER[model]:,.0f}" if model in PEER else "-"
        ms = 1000 * batch * nproc / rate if rate else float("nan")
        was, gain = (f"{old:,.0f}", f"{rate / old:.2f}x") if old else ("-", "-")
        print(f"{model:9} {MODELS[model][3]:>4} {batch:>6} {nproc:>5} {steps:>5} {rate:>10,.0f} {ms:>8.2f} "
              f"{was:>9} {gain:>8} {vs_peer:>8} {target:>9}")
    for model in floors[0]:
        rate = statistics.median(f[model] for f in floors)
        print(f"{model + '*':9} {MODELS[model][3]:>4} {256:>6} {1:>5} {'-':>5} {rate:>10,.0f} {256000 / rate:>8.2f} "
              f"{'-':>9} {'-':>8} {rate / PEER[model]:>7.2f}x {TARGET_X * PEER[model]:>9,.0f}")
    print("* eager floor (benchmarks/eager_floor.py): the model's dense step alone in plain PyTorch on in-memory "
          "synthetic batches, no TorchRec, no loader; measured once per repetition, right after its rows")
    for (model, batch, nproc, _), (new, _) in rates.items():
        floor_model = "din" if model.startswith("din") else model
        if batch == 256 and nproc == 1 and floor_model in floors[0]:
            share = ratio([r / f[floor_model] for r, f in zip(new, floors, strict=True)])
            print(f"{model} trainer / eager floor, paired by repetition: {share}")
    if args.baseline:
        for (model, batch, nproc, _), (new, old) in rates.items():
            gains = [n / o for n, o in zip(new, old, strict=True)]
            print(f"{model} b{batch} p{nproc} speed-up over {args.baseline}, paired by repetition: {ratio(gains)}")
        print(f"before = the same rows on git revision {args.baseline}, run alternately with the new code")
    print(f"best of {args.repeat} run(s) per row, {args.steps} steps each (the machine is shared: the fastest "
          "run is the least disturbed one); the floor rows are medians, the floor shares geometric means of the "
          "per-repetition ratios with a 95% t-interval")


def eager_floor(threads: int) -> dict[str, float]:
    """{model: samples/s} of benchmarks/eager_floor.py's eager step, in its own process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    return json.loads(subprocess.run([sys.executable, str(ROOT / "benchmarks" / "eager_floor.py"), "--json"],
                                     env=env, check=True, capture_output=True, text=True).stdout)


if __name__ == "__main__":
    main()
