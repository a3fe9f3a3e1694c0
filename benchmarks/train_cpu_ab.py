"""CPU time per training step, this checkout vs a git revision: a load-robust before/after.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_cpu_ab.py --baseline REV [--models din,mmoe] [--reps 3]

Wall-clock samples/s (benchmarks/train_throughput.py) moves by +-40% on a machine shared with
other jobs; the CPU time a process spends is much steadier. Each measurement is one fresh
interpreter running the real Trainer (DMP, fused tables, pipeline, Parquet loader) in-process for
S and 4S steps at the train_throughput.py shapes; (cpu(4S) - cpu(S)) / 3S is the CPU time of a
step without start-up, planning, the first pipeline trace or the final checkpoint. Old and new
alternate; the median over --reps is reported.
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

from train_throughput import export_revision  # a sibling script: benchmarks/ is on sys.path when run

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, sys, tempfile, time
sys.path.insert(0, {bench!r})
from train_throughput import MODELS
from trec_rank.config.experiment import load_config
from trec_rank.parallel.env import init_distributed, shutdown
from trec_rank.train.loop import Trainer
config, subdir, sets, _ = MODELS[{model!r}]
sets = [*sets, "data.path={data}/" + subdir, "data.batch_size=256", "train.max_steps={steps}",
        "data.eval_splits=[]", "train.checkpoint_every=1000000", "train.epochs=1000", "train.log_every=1000000"]
cfg = load_config({root!r} + "/" + config, sets)
env = init_distributed("cpu")
with tempfile.TemporaryDirectory() as tmp:
    trainer = Trainer(cfg, env, tmp)
    t0 = time.process_time()
    trainer.fit()
    print(json.dumps({{"cpu": time.process_time() - t0}}))
shutdown()
"""


def cpu_seconds(code: Path, model: str, steps: int, data: Path) -> float:
    src = CHILD.format(bench=str(ROOT / "benchmarks"), model=model, data=data, steps=steps, root=str(ROOT))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(code)}
    proc = subprocess.run([sys.executable, "-c", src], cwd=code, env=env, capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode:
        sys.exit(f"{model} on {code} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["cpu"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="git revision to compare with (its trec_rank, same venv)")
    p.add_argument("--models", default="din,din-l2off,mmoe")
    p.add_argument("--steps", type=int, default=40, help="S: the short run; the long one is 4S")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--data", default=str(ROOT / "data"))
    args = p.parse_args()
    results: dict[str, tuple[list[float], list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp)
        export_revision(args.baseline, before)
        for _ in range(args.reps):
            for model in args.models.split(","):
                old, new = results.setdefault(model, ([], []))
                for code, out in ((before, old), (ROOT, new)):
                    short = cpu_seconds(code, model, args.steps, Path(args.data))
                    long = cpu_seconds(code, model, 4 * args.steps, Path(args.data))
                    out.append((long - short) / (3 * args.steps))
    print(f"{'model':9} {'cpu ms/step before':>18} {'after':>8} {'speed-up':>8} {'cpu-bound samples/s':>20}")
    for model, (old, new) in results.items():
        o, n = statistics.median(old), statistics.median(new)
        print(f"{model:9} {1000 * o:>18.2f} {1000 * n:>8.2f} {o / n:>7.2f}x {256 / n:>20,.0f}")
    print(f"median of {args.reps} alternating old/new pairs; before = git revision {args.baseline}; batch 256, "
          "1 process, OMP_NUM_THREADS=1; cpu-bound samples/s = 256 / (CPU s per step)")


if __name__ == "__main__":
    main()
