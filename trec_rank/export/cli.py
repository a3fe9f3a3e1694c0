"""The `export` subcommand: argparse front end of `trec_rank.export.job` (registered by trec_rank/cli.py)."""

from __future__ import annotations

import argparse


def _export(args: argparse.Namespace) -> None:
    from trec_rank.export.job import ExportRequest, run

    run(ExportRequest(config=args.config, overrides=args.set, checkpoint=args.checkpoint, out=args.out,
                      quantize=args.quantize, eval_split=args.eval_split))


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    """Add `trec-rank export` to the top-level subparsers."""
    e = sub.add_parser("export", help="a ranking checkpoint as a torch.export program (model.pt2) with its input "
                                      "contract and schema (artifact.json); runs without trec_rank")
    e.add_argument("config", help="experiment YAML the checkpoint was trained with (ranking models only)")
    e.add_argument("--checkpoint", required=True, help="checkpoint dir, or a run dir (its latest checkpoint)")
    e.add_argument("--out", required=True, help="artifact directory: new, empty, or an earlier export (replaced)")
    e.add_argument("--quantize", choices=["int8"], help="int8 embedding tables (TorchRec's row-wise int8 modules)")
    e.add_argument("--eval-split", default="test", help="labelled split under data.path the saved program is "
                   "checked on (exported vs eager probabilities; int8: the AUC change vs fp32); '' to skip. "
                   "Default: test, skipped when absent")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value as at training (repeatable; value parsed as YAML)")
    e.set_defaults(func=_export)
