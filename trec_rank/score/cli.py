"""The `score` subcommand: argparse front end of `trec_rank.score.job` (registered by trec_rank/cli.py)."""

from __future__ import annotations

import argparse


def _score(args: argparse.Namespace) -> None:
    from trec_rank.score.output import check_paths

    check_paths(args.input, args.output)  # before the config, the checkpoint and torch are loaded
    from trec_rank.config.experiment import load_config
    from trec_rank.score.job import ScoreRequest, run

    passthrough = None if args.passthrough is None else [c.strip() for c in args.passthrough.split(",") if c.strip()]
    run(ScoreRequest(config=load_config(args.config, args.set), checkpoint=args.checkpoint, input=args.input,
                     output=args.output, passthrough=passthrough, batch_size=args.batch_size,
                     part_rows=args.part_rows, plan=args.plan, quantize=args.quantize, sharded=args.sharded))


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    """Add `trec-rank score` to the top-level subparsers."""
    s = sub.add_parser("score", help="score Parquet rows with a checkpoint: resumable, exactly-once, 1 process or "
                                     "torchrun ranks; writes OUT/part-*.parquet and OUT/_SUCCESS")
    s.add_argument("config", help="experiment YAML the checkpoint was trained with")
    s.add_argument("--checkpoint", required=True, help="checkpoint dir, or a run dir (its latest checkpoint)")
    s.add_argument("--input", required=True, help="Parquet file or directory (same columns as training; "
                                                  "labels optional)")
    s.add_argument("--output", required=True, help="output directory, outside --input; rerun with the same "
                   "arguments to resume")
    s.add_argument("--passthrough", metavar="COL,COL", help="input columns copied next to the scores (default: "
                   "the data.group_by column, user_id and item_id when present; '' for none)")
    s.add_argument("--batch-size", type=int, help="rows per forward (default: data.eval_batch_size)")
    s.add_argument("--part-rows", type=int, help="rows per output part, a multiple of the batch size. Default: "
                   "input rows / 64, rounded down to whole read windows (a window is the largest multiple of the "
                   "batch size up to 8,192 rows), at least one window and at most 65,536 rows; so an input under "
                   "~1M rows gets one window per part. A resumed run keeps the first run's value")
    s.add_argument("--sharded", action="store_true", help="shard the tables across the ranks as in training "
                   "(default: only when one copy per process does not fit in memory)")
    s.add_argument("--plan", help="sharding plan JSON from `trec-rank plan` (implies --sharded; default: plan "
                   "collectively as in training)")
    s.add_argument("--quantize", choices=["int8"], help="int8 embedding tables; prints the AUC change vs fp32 "
                   "when the input has labels")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.num_workers=2 (repeatable; value parsed as YAML)")
    s.set_defaults(func=_score)
