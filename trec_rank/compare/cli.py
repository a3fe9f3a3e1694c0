"""`trec-rank compare RUN_A RUN_B` / `trec-rank compare --a RUN... --b RUN...`: is A better than B, beyond noise?

Prints, for each metric both sides report on the split, the two means, A - B and its paired
bootstrap interval (users resampled, and runs too when a side has several seeds), and a plain
verdict. `--json` writes the same numbers for scripts (benchmarks/actions_2x2.py reads them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trec_rank.compare.bootstrap import Interval, paired_bootstrap


def compare(a: list[str], b: list[str], split: str = "test", metrics: list[str] | None = None,
            resamples: int = 2000, seed: int = 0) -> tuple[int, dict[str, Interval]]:
    """(units, {metric: Interval}) for the runs of side A against those of side B on `split`."""
    from trec_rank.compare.runs import load_runs  # pyarrow and the metrics: only when comparing

    runs = load_runs([*a, *b], split)
    names = runs.metrics
    if metrics:
        unknown = [m for m in metrics if m not in names]
        if unknown:
            raise ValueError(f"--metrics: {', '.join(unknown)} not reported by every run (shared: {', '.join(names)})")
        names = metrics
    sa, sb = runs.stats[:len(a)], runs.stats[len(a):]
    return runs.units, {m: paired_bootstrap([s[m] for s in sa], [s[m] for s in sb], runs.units, resamples, seed,
                                            width=runs.width) for m in names}


def _side(runs: list[str]) -> str:
    return runs[0] if len(runs) == 1 else f"{len(runs)} runs ({', '.join(runs)})"


def _run(args: argparse.Namespace) -> None:
    a, b = (args.a or []) + args.runs[:1], (args.b or []) + args.runs[1:]
    if args.runs and (args.a or args.b or len(args.runs) != 2):
        raise ValueError("compare: give either two runs (RUN_A RUN_B) or --a RUN... --b RUN...")
    if not a or not b:
        raise ValueError("compare: both sides need at least one run directory")
    metrics = args.metrics.split(",") if args.metrics else None
    units, result = compare(a, b, args.split, metrics, args.resamples, args.seed)
    seeds = " and runs (seeds)" if len(a) > 1 or len(b) > 1 else ""
    print(f"A: {_side(a)}\nB: {_side(b)}")
    print(f"split {args.split}: {units} paired units (users/groups); paired bootstrap over units{seeds}, "
          f"{args.resamples} resamples, seed {args.seed}\n")
    print("| metric | A | B | A - B | 95% interval | verdict |\n|---|---|---|---|---|---|")
    for name, iv in result.items():
        print(f"| {name} | {iv.mean_a:.4f} | {iv.mean_b:.4f} | {iv.diff:+.4f} | [{iv.low:+.4f}, {iv.high:+.4f}] | "
              f"{iv.verdict} |")
    if args.json:
        out = {"a": a, "b": b, "split": args.split, "units": units, "resamples": args.resamples, "seed": args.seed,
               "metrics": {n: {**iv.__dict__, "verdict": iv.verdict} for n, iv in result.items()}}
        Path(args.json).write_text(json.dumps(out, indent=1))


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compare", help="paired bootstrap 95%% intervals between runs on the same split",
                       description=__doc__.splitlines()[0])
    c.add_argument("runs", nargs="*", help="RUN_A RUN_B (run directories with eval_rows.parquet)")
    c.add_argument("--a", nargs="+", metavar="RUN", help="side A: one or more runs (several seeds)")
    c.add_argument("--b", nargs="+", metavar="RUN", help="side B: one or more runs (several seeds)")
    c.add_argument("--split", default="test", help="which split's rows to pair (default: test)")
    c.add_argument("--metrics", help="comma-separated subset, e.g. ndcg@10,hr@10,mrr (default: all shared)")
    c.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    c.add_argument("--seed", type=int, default=0, help="resampling seed (fixed: same inputs, same interval)")
    c.add_argument("--json", help="also write the numbers to this JSON file")
    c.set_defaults(func=_run)
