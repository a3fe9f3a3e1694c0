"""The ranking claims of benchmarks/quality.md, retrained over seeds and restated with paired 95% intervals.

Every model-vs-model sentence in quality.md ("the feedback term raises GAUC", "the towers are level",
"the HSTU encoder lifts the funnel tasks") is re-measured here as `trec-rank compare` sees it: the
runs of both sides on the same split, test rows paired by user (ranking: data.group_by's groups;
adult has none, so each row is its own unit) and seeds resampled too. Runs are trained through the
CLI (`--set train.seed=S --set data.seed=S`) and skipped when their metrics.json exists, so a stopped
grid resumes; retrieval's HSTU/SASRec grid is `actions_2x2.py`.

    .venv/bin/python -m benchmarks.claims --out runs/claims [--groups adult ml100k funnel] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from benchmarks.actions_2x2 import paired, train


@dataclass(frozen=True)
class Group:
    """Variants (name -> config and overrides) trained on one split, and the pairs compared on it."""

    variants: dict[str, tuple[str, tuple[str, ...]]]
    pairs: list[tuple[str, str]]
    metrics: list[str]


ONE_EVAL_PER_EPOCH = ("train.eval_every=276",)  # quality.md's DIN runs: ml-100k ranking/ has 276 steps/epoch
GROUPS = {
    "adult": Group(
        {name: (f"configs/adult_{name}.yaml", ()) for name in ("shared_bottom", "moe", "mmoe", "cgc", "ple")},
        [("moe", "shared_bottom"), ("mmoe", "shared_bottom"), ("cgc", "shared_bottom"), ("ple", "shared_bottom"),
         ("ple", "mmoe")],
        ["income/auc", "never_married/auc"]),
    "ml100k": Group(
        {"din": ("configs/ml100k_din.yaml", ONE_EVAL_PER_EPOCH),
         "din_feedback": ("configs/ml100k_din_feedback.yaml", ONE_EVAL_PER_EPOCH),
         "hstu_ranking": ("configs/ml100k_hstu_ranking.yaml", ())},
        [("din_feedback", "din"), ("hstu_ranking", "din")],
        ["like/auc", "like/gauc", "like/logloss"]),
    "funnel": Group(
        {"esmm": ("configs/ml100k_esmm.yaml", ()), "esmm_din": ("configs/ml100k_esmm_din.yaml", ()),
         "hstu_esmm": ("configs/ml100k_hstu_esmm.yaml", ())},
        [("esmm_din", "esmm"), ("hstu_esmm", "esmm_din"), ("hstu_esmm", "esmm")],
        ["watch/auc", "watch/gauc", "like/auc", "like/gauc"]),
}


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def report(name: str, group: Group, runs: dict[str, list[Path]], seeds: list[int], out: Path) -> None:
    print(f"\n### {name}: seeds {seeds}, test, mean ± sd over seeds\n")
    print("| variant | " + " | ".join(group.metrics) + " | s / run |\n|---|" + "---|" * (len(group.metrics) + 1))
    for v, paths in runs.items():
        tests = [json.loads((p / "metrics.json").read_text())["test"] for p in paths]
        walls = [json.loads((p / "wall.json").read_text())["seconds"] for p in paths if (p / "wall.json").is_file()]
        cells = [mean_sd([t[m] for t in tests]) for m in group.metrics]
        wall = f"{statistics.mean(walls):.0f}" if walls else "—"
        print(f"| {v} | " + " | ".join(cells) + f" | {wall} |")
    print(f"\npaired 95% intervals of A - B on test (`trec-rank compare`, seeds {seeds} and users/rows "
          "resampled; * = the interval excludes 0)\n")
    print("| A | B | " + " | ".join(f"{m}: A - B [95%]" for m in group.metrics) + " |\n|---|---|"
          + "---|" * len(group.metrics))
    for a, b in group.pairs:
        res = paired(runs[a], runs[b], out / f"compare-{a}-vs-{b}.json", group.metrics)
        cells = [f"{res[m]['diff']:+.4f} [{res[m]['low']:+.4f}, {res[m]['high']:+.4f}]"
                 + (" *" if res[m]["low"] > 0 or res[m]["high"] < 0 else "") for m in group.metrics]
        print(f"| {a} | {b} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", nargs="+", choices=sorted(GROUPS), default=list(GROUPS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("runs/claims"))
    args = p.parse_args()
    for name in args.groups:
        group = GROUPS[name]
        runs = {v: [args.out / name / f"{v}-s{s}" for s in args.seeds] for v in group.variants}
        for v, (config, sets) in group.variants.items():
            for run, seed in zip(runs[v], args.seeds, strict=True):
                train(run, config, seed, list(sets))
        report(name, group, runs, args.seeds, args.out / name)


if __name__ == "__main__":
    main()
