"""Retrieval entry points: `train` and `evaluate`, called by `trec-rank train/eval` for `kind: retrieval`
configs, and a standalone `python -m trec_rank.retrieval.cli {train,eval}` (also under torchrun).

Both functions set up (and tear down) the process group themselves, like the ranking commands,
and return the metrics dict they write to metrics.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from trec_rank.config.typed import ConfigError


def train(config: str, overrides: list[str], run_dir: str, resume: bool) -> dict:
    """Train (with `resume`: from run_dir's latest complete checkpoint); returns metrics.json's dict."""
    from trec_rank.parallel.env import init_distributed, shutdown
    from trec_rank.retrieval.config import load_retrieval_config
    from trec_rank.retrieval.trainer import RetrievalTrainer
    from trec_rank.train import checkpoint

    cfg = load_retrieval_config(config, overrides)
    env = init_distributed(cfg.sharding.device)
    try:
        trainer = RetrievalTrainer(cfg, env, run_dir)
        if resume:
            found = checkpoint.complete_checkpoints(Path(run_dir) / "checkpoints")
            if found:
                trainer.resume(found[-1])
            elif env.is_main:
                logging.getLogger(__name__).info("--resume: no checkpoint in %s, starting fresh", run_dir)
        return trainer.fit()
    finally:
        shutdown()


def evaluate(config: str, overrides: list[str], checkpoint: str, run_dir: str | None) -> dict:
    """Full-corpus valid/test metrics of a checkpoint (a checkpoint dir, or a run dir: its latest)."""
    from trec_rank.compare.rows import write_retrieval_rows
    from trec_rank.parallel.env import init_distributed, shutdown
    from trec_rank.retrieval.config import load_retrieval_config
    from trec_rank.retrieval.trainer import RetrievalTrainer
    from trec_rank.train import checkpoint as ckpt_io

    cfg = load_retrieval_config(config, overrides)
    ckpt = ckpt_io.resolve(checkpoint)
    state = ckpt_io.read_state(ckpt)
    if state.get("fingerprint") != cfg.fingerprint():
        raise ValueError(f"{ckpt}: checkpoint was trained with another item table/model than {config}")
    env = init_distributed(cfg.sharding.device)
    try:
        out = Path(run_dir or ckpt)
        trainer = RetrievalTrainer(cfg, env, out)
        ckpt_io.load(ckpt, trainer.model, None)
        results = trainer.evaluate()
        if env.is_main:
            (out / "metrics.json").write_text(json.dumps(results, indent=1, sort_keys=True))
            write_retrieval_rows(out, results)  # per-user rows for `trec-rank compare`
        return results
    finally:
        shutdown()


def _print(results: dict) -> None:
    for split, values in results.items():
        print(f"{split:>6}: " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(values.items())))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trec_rank.retrieval.cli", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("config")
    t.add_argument("--run-dir", required=True)
    t.add_argument("--resume", action="store_true")
    e = sub.add_parser("eval")
    e.add_argument("config")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--run-dir")
    for s in (t, e):
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("trec_rank").setLevel(logging.INFO)
    try:
        if args.command == "train":
            results = train(args.config, args.set, args.run_dir, args.resume)
        else:
            results = evaluate(args.config, args.set, args.checkpoint, args.run_dir)
    except (ValueError, FileNotFoundError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        _print(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
