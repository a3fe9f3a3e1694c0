"""Where a training step's time goes: cProfile (Python) or torch.profiler (ops) over `Trainer.fit`.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_train.py din [--steps 100] [--torch] [--top 40]

Same shapes and overrides as benchmarks/train_throughput.py, one process (in-memory store), the
real Trainer (DMP, fused tables, pipeline, Parquet loader); evaluation and checkpoints are off.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import MODELS, ROOT  # noqa: E402

from trec_rank.config.experiment import load_config  # noqa: E402
from trec_rank.parallel.env import init_distributed, shutdown  # noqa: E402
from trec_rank.train.loop import Trainer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=sorted(MODELS))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--torch", action="store_true", help="torch.profiler op table instead of cProfile")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--sort", default="tottime")
    args = p.parse_args()
    config, subdir, sets, _ = MODELS[args.model]
    sets = [*sets, f"data.path={ROOT / 'data' / subdir}", "data.batch_size=256", f"train.max_steps={args.steps}",
            "data.eval_splits=[]", "train.checkpoint_every=1000000", "train.epochs=1000",
            "train.log_every=1000000"]
    cfg = load_config(ROOT / config, sets)
    env = init_distributed("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, env, tmp)
        if args.torch:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                trainer.fit()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
        else:
            prof = cProfile.Profile()
            prof.enable()
            trainer.fit()
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats(args.sort).print_stats(args.top)
            print(s.getvalue())
        speed = (Path(tmp) / "throughput.json").read_text()
    print(speed)
    shutdown()


if __name__ == "__main__":
    main()
