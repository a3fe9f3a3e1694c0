"""`trec-rank {data,train,eval,plan,score,compare,report}`: the one user-facing entry point.

User mistakes (bad config key, missing column, wrong checkpoint) end with one `error:` line
naming the key/file/column and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

SET_HELP = "override a config value, e.g. --set train.epochs=3 (repeatable; value parsed as YAML)"
EVAL_SET_HELP = "override a config value, e.g. --set data.eval_batch_size=4096 (repeatable; value parsed as YAML)"


def _data(args: argparse.Namespace) -> None:
    if args.dataset == "describe":
        from trec_rank.data.describe import write_or_print

        if not args.path:
            raise ValueError("data describe: give a Parquet file or folder, e.g. trec-rank data describe data/mine")
        write_or_print(args.path, args.out)
        return
    if args.path:
        raise ValueError(f"data {args.dataset}: unexpected argument '{args.path}' (use --source for an input file)")
    if not args.out:
        raise ValueError(f"data {args.dataset}: --out DIR is required")
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


def load_config_only(config: str, overrides: list[str]) -> Any:
    """The typed ranking or retrieval (`kind: retrieval` at the top level) config; imports no torch, so
    a config mistake is reported in a fraction of a second."""
    from trec_rank.retrieval.config import is_retrieval_config

    if is_retrieval_config(config):
        from trec_rank.retrieval.config import load_retrieval_config

        return load_retrieval_config(config, overrides)
    from trec_rank.config.experiment import load_config

    return load_config(config, overrides)


def is_retrieval(cfg: Any) -> bool:
    """A loaded retrieval (HSTU/SASRec next-item) config, as opposed to a ranking one."""
    from trec_rank.retrieval.config import RetrievalConfig

    return isinstance(cfg, RetrievalConfig)


def model_spec(cfg: Any) -> Any:
    """The ModelSpec (what is sharded, planned and checkpointed) of a loaded config."""
    if is_retrieval(cfg):
        from trec_rank.retrieval.trainer import retrieval_spec

        return retrieval_spec(cfg)
    from trec_rank.runtime.model import ranking_spec

    return ranking_spec(cfg)


def load_job(config: str, overrides: list[str]) -> tuple[Any, Any]:
    """(typed config, ModelSpec) of a ranking or a retrieval config."""
    cfg = load_config_only(config, overrides)
    return cfg, model_spec(cfg)


def require_data(cfg: Any, config: str, splits: list[str]) -> None:
    """Before anything heavy loads: the data the job reads exists (retrieval: data.path; ranking: its
    `splits` under data.path), else one line naming the path as written and the command that makes it."""
    root = Path(cfg.data.path)
    paths = [root] if is_retrieval(cfg) else [root / s for s in splits]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{config}: data.path {cfg.data.path}: {path} does not exist; "
                                    f"{_data_command(root)}")


def _data_command(root: Path) -> str:
    """Which `trec-rank data` command writes a dataset root like this one."""
    parent = root.parent if root.name in ("ranking", "funnel", "sequences", "adult") else root
    name = parent.name
    if name in ("ml-100k", "adult"):
        return f"create it with `trec-rank data {name} --out {parent}`"
    if name in ("ml-1m", "ml-20m"):
        return f"create it with `trec-rank data {name} --source YOUR_DOWNLOAD --out {parent}`"
    if name.startswith("synthetic"):
        return f"create it with `trec-rank data synthetic --schema CONFIG --out {parent}`"
    return "point data.path at your Parquet (`trec-rank data describe PATH` starts a config for it)"


def train(config: str, overrides: list[str], run_dir: str, resume: bool = False, init_from: str | None = None,
          plan_path: str | None = None, overwrite: bool = False) -> dict:
    """Train a ranking or retrieval config; returns (and writes) metrics.json's dict."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in --run-dir, --overwrite replaces it: pass one of them")
    cfg = load_config_only(config, overrides)  # config and data mistakes surface before torch loads
    require_data(cfg, config, [] if is_retrieval(cfg)
                 else [cfg.data.train_split, *cfg.data.eval_splits])
    from trec_rank.parallel.env import init_distributed, shutdown
    from trec_rank.runtime import checkpoint
    from trec_rank.runtime.run import StopSignal, claim

    spec = model_spec(cfg)
    env = init_distributed(cfg.sharding.device, run_dir=run_dir)  # every rank must see the same run dir
    stop = StopSignal()
    try:
        claim(run_dir, env, resume, overwrite)
        plan = None
        if plan_path:
            from trec_rank.plan.io import load_plan

            plan = load_plan(plan_path, spec, env.world_size, env.local_world_size, env.device.type)
        trainer: Any
        if is_retrieval(cfg):
            from trec_rank.retrieval.trainer import RetrievalTrainer

            trainer = RetrievalTrainer(cfg, env, run_dir, plan)
        else:
            from trec_rank.train.loop import Trainer

            trainer = Trainer(cfg, env, run_dir, plan)
        if init_from:
            trainer.run.load(checkpoint.resolve(init_from), trainer.model, None)
        if resume:
            found = checkpoint.latest(run_dir)
            if found:
                trainer.resume(found)
            elif env.is_main:
                logging.getLogger(__name__).info("--resume: no complete checkpoint in %s, starting fresh", run_dir)
        return trainer.fit(stop)
    finally:
        stop.close()
        shutdown()


def evaluate(config: str, overrides: list[str], ckpt_path: str, run_dir: str | None = None,
             splits: list[str] | None = None) -> dict:
    """Eval-split metrics of a checkpoint (a checkpoint dir, or a run dir: its latest); writes metrics.json."""
    import json

    cfg = load_config_only(config, overrides)  # config and data mistakes surface before torch loads
    retrieval = is_retrieval(cfg)
    require_data(cfg, config, [] if retrieval else splits or cfg.data.eval_splits)
    from trec_rank.parallel.env import init_distributed, shutdown
    from trec_rank.runtime import checkpoint

    spec = model_spec(cfg)
    ckpt = checkpoint.resolve(ckpt_path)
    checkpoint.check(ckpt, spec.fingerprint, config)
    if retrieval and splits:
        raise ValueError("--splits is not supported for retrieval configs (valid and test are always reported)")
    env = init_distributed(cfg.sharding.device)
    try:
        out = Path(run_dir) if run_dir else eval_dir(ckpt)
        if retrieval:
            from trec_rank.retrieval.trainer import RetrievalTrainer

            trainer = RetrievalTrainer(cfg, env, out)
            checkpoint.load(ckpt, trainer.model, None)
            results = trainer.evaluate()
        else:
            from trec_rank.runtime.eval_rows import RankingRows
            from trec_rank.runtime.model import shard_model
            from trec_rank.train.build import open_split
            from trec_rank.train.loop import evaluate as evaluate_split

            model = shard_model(spec, env)
            checkpoint.load(ckpt, model, None)
            rows = RankingRows(cfg.model.tasks)
            results = {s: evaluate_split(model, open_split(cfg, s, env, train=False), cfg, env, rows, s)
                       for s in splits or cfg.data.eval_splits}
            rows.write(out, env.is_main)  # per-row results, for `trec-rank compare`
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps(results, indent=1, sort_keys=True))
            if retrieval:
                from trec_rank.runtime.eval_rows import write_retrieval_rows

                write_retrieval_rows(out, results)  # per-user results, for `trec-rank compare`
        return results
    finally:
        shutdown()


def eval_dir(ckpt: Path) -> Path:
    """RUN_DIR/eval/step-N for RUN_DIR/{checkpoints,best}/step-N (else beside the checkpoint dir)."""
    run = ckpt.parent.parent if ckpt.parent.name in ("checkpoints", "best") else ckpt.parent
    return run / "eval" / ckpt.name


def _train(args: argparse.Namespace) -> None:
    results = train(args.config, args.set, args.run_dir, args.resume, args.init_from, args.plan, args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        _print_metrics(results, Path(args.run_dir) / "metrics.json")


def _eval(args: argparse.Namespace) -> None:
    splits = args.splits.split(",") if args.splits else None
    results = evaluate(args.config, args.set, args.checkpoint, args.run_dir, splits)
    if int(os.environ.get("RANK", "0")) == 0:
        from trec_rank.runtime.checkpoint import resolve

        _print_metrics(results, Path(args.run_dir or eval_dir(resolve(args.checkpoint))) / "metrics.json")


def _print_metrics(results: dict, path: Path) -> None:
    for split, values in results.items():
        print(f"{split:>6}: " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(values.items())))
    print(f"metrics written to {path}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trec-rank", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="prepare a dataset as Parquet (ml-100k, ml-1m, ml-20m, adult, synthetic), or "
                                    "describe your own Parquet as a starter config")
    d.add_argument("dataset", choices=["ml-100k", "ml-1m", "ml-20m", "adult", "synthetic", "describe"])
    d.add_argument("path", nargs="?", help="describe: a Parquet file or folder (a folder of split folders too)")
    d.add_argument("--out", help="output directory (describe: a YAML file to write instead of printing)")
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
    t.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its latest complete "
                   "checkpoint (a RUN_DIR holding a run is refused without --resume or --overwrite)")
    t.add_argument("--overwrite", action="store_true", help="replace the run RUN_DIR holds (its checkpoints, "
                   "metrics, TensorBoard logs) with a new one")
    t.add_argument("--init-from", metavar="CKPT", help="start from these weights (checkpoint or run dir), "
                   "with fresh optimizer state and step 0; --resume wins when RUN_DIR has a checkpoint")
    t.add_argument("--plan", help="sharding plan JSON from `trec-rank plan --out` (default: plan collectively)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint on the eval splits; writes metrics.json")
    e.add_argument("config", help="experiment YAML the checkpoint was trained with")
    e.add_argument("--checkpoint", required=True, help="checkpoint dir, or a run dir (its latest checkpoint)")
    e.add_argument("--run-dir", help="where metrics.json goes (default: RUN_DIR/eval/step-N/ of the checkpoint's "
                   "run, outside checkpoints/ so rotation never removes it)")
    e.add_argument("--splits", help="comma-separated splits (default: data.eval_splits)")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=EVAL_SET_HELP)
    e.set_defaults(func=_eval)

    from trec_rank.compare.cli import add_subcommand as add_compare
    from trec_rank.export.cli import add_subcommand as add_export
    from trec_rank.plan.cli import add_subcommand as add_plan
    from trec_rank.report import add_subcommand as add_report
    from trec_rank.score.cli import add_subcommand as add_score
    from trec_rank.serve.cli import add_subcommand as add_serve

    add_plan(sub, load_job)
    add_score(sub)
    add_report(sub)
    add_compare(sub)
    add_export(sub)
    add_serve(sub)
    return p


def _output(verbose: bool) -> None:
    """Our INFO lines (rank 0 only under torchrun: progress and summaries once) and our warnings;
    third-party warnings and logs (planner, DDP, ShardedTensor deprecations, fbgemm's per-table INFO)
    only with -v, since a user cannot act on them."""
    main_rank = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.WARNING if verbose else logging.ERROR,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:  # torch resets its loggers when imported (after this): ask it for errors only
        os.environ.setdefault("TORCH_LOGS", "-all")
    ours = logging.DEBUG if verbose else logging.INFO
    logging.getLogger("trec_rank").setLevel(ours if main_rank else logging.WARNING)
    if not verbose:  # ours are log lines (trec_rank loggers), never Python warnings
        warnings.filterwarnings("ignore")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _output(args.verbose)
    try:
        return _run(args)
    finally:  # the command's frames (and any exception it handled) are gone: its process group can go too
        if "trec_rank.parallel.env" in sys.modules:
            from trec_rank.parallel.env import free_process_groups

            free_process_groups()


def _run(args: argparse.Namespace) -> int:
    """The command; user errors become one `error:` line and an exit code, bugs keep their traceback."""
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:  # ConfigError and DataError are ValueErrors
        if args.verbose:
            raise
        return _fail(str(err), 2)
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one: no traceback
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        # Nothing heavy is imported before the command runs, so `data` and `--help` work on a node
        # whose CUDA install cannot load (no NVIDIA driver); the commands that need torchrec say why.
        from trec_rank.parallel.env import missing_driver, record_failure

        if (why := missing_driver(err)) is not None:
            return _fail(why, 2)
        from trec_rank.runtime.run import Interrupted, NonFiniteLoss

        if isinstance(err, Interrupted):  # SIGTERM/SIGINT: every rank stopped after a checkpoint
            if int(os.environ.get("RANK", "0")) == 0:
                print(err, file=sys.stderr)
            return 128 + err.signum
        if not isinstance(err, NonFiniteLoss):
            record_failure(err)
            raise
        return _fail(str(err), 3)
    return 0


def _fail(message: str, code: int) -> int:
    """One `error:` line; under torchrun also the job's root cause (TorchX prints it on failure)."""
    print(f"error: {message}", file=sys.stderr)
    if "TORCHELASTIC_ERROR_FILE" in os.environ:
        from trec_rank.parallel.env import record_failure

        record_failure(message)
    return code


if __name__ == "__main__":
    sys.exit(main())
