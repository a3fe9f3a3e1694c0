"""Training throughput of the base model: samples/s for batch 256 and 4096, on 1 and 2 processes.

    .venv/bin/python benchmarks/train_throughput.py [--data data/ml-100k] [--steps 80]

Runs the real CLI (DMP + planner + TrainPipelineSparseDist, gloo on CPU) on ml-100k `ranking/`
with every table at dim 16 and history 50, evaluation off, and reads RUN_DIR/throughput.json
(samples/s over the training steps only). The ratio column is against 1 process at batch 256,
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIM16 = [f"schema.tables.{i}.embedding_dim=16" for i in range(7)]


def run(data: Path, nproc: int, batch: int, steps: int, run_dir: Path) -> dict:
    sets = [*DIM16, f"data.path={data}/ranking", f"data.batch_size={batch}", f"train.max_steps={steps}",
            "data.eval_splits=[]", "train.checkpoint_every=1000000", "train.epochs=100"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "trec_rank.cli", "train", "configs/ml100k_base.yaml", "--run-dir", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // nproc)), "PYTHONWARNINGS": "ignore"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=1800)
    return json.loads((run_dir / "throughput.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "data" / "ml-100k"), help="prepared ml-100k root")
    p.add_argument("--steps", type=int, default=80, help="training steps per measurement (batch 256)")
    args = p.parse_args()
    data = Path(args.data)
    if not (data / "ranking").is_dir():
        subprocess.run([sys.executable, "-m", "trec_rank.cli", "data", "ml-100k", "--out", str(data)], check=True)
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (256, 4096):
            for nproc in (1, 2):
                steps = args.steps if batch == 256 else max(8, args.steps // 8)
                out = run(data, nproc, batch, steps, Path(tmp) / f"b{batch}-p{nproc}")
                base = base or out["samples_per_s"]
                rows.append((batch, nproc, out["steps"], out["samples_per_s"], out["samples_per_s"] / base))
    print(f"{'model':8} {'emb':>4} {'hist':>4} {'batch':>6} {'procs':>5} {'steps':>5} {'samples/s':>10} "
          f"{'vs 1p/256':>9}")
    for batch, nproc, steps, rate, ratio in rows:
        print(f"{'base':8} {16:>4} {50:>4} {batch:>6} {nproc:>5} {steps:>5} {rate:>10,.0f} {ratio:>8.2f}x")


if __name__ == "__main__":
    main()
