"""`trec-rank report RUN_DIR [RUN_DIR ...]`: curves of one or more runs in one PNG, final metrics side by side.

Sources, all written by the trainers (docs/run-files.md):
  RUN_DIR/tb/events.*            TensorBoard scalars; `train/loss` over steps (ranking runs log it every
                                 `train.log_every` steps). Read with tensorboard's EventAccumulator, so
                                 every events file of a resumed run counts.
  RUN_DIR/metrics_history.jsonl  one line per evaluation: {"step": N, "<split>": {"<task>/<metric>": v}}.
  RUN_DIR/metrics.json           the final metrics (the table's values; the last history line if absent).
A step logged twice (a resumed run repeats the steps after its last checkpoint) keeps its last value.
The figure is drawn with matplotlib's Agg backend (a Figure without pyplot), so no display is needed.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.artist import Artist

Curve = dict[int, float]  # step -> value


def _history(run: Path) -> dict[str, Curve]:
    """'<split>/<task>/<metric>' -> curve, from metrics_history.jsonl."""
    curves: dict[str, Curve] = {}
    path = run / "metrics_history.jsonl"
    if not path.is_file():
        return curves
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            step = int(entry["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ValueError(f"{path}, line {no}: not a metrics history entry") from None
        for split, values in entry.items():
            if isinstance(values, dict):
                for key, value in values.items():
                    curves.setdefault(f"{split}/{key}", {})[step] = float(value)
    return curves


def _train_loss(run: Path) -> Curve:
    """`train/loss` from the TensorBoard events under RUN_DIR/tb (empty when there are none)."""
    tb = run / "tb"
    if not tb.is_dir() or not any(tb.glob("events.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})  # 0: keep every point, not a sample
    acc.Reload()
    if "train/loss" not in acc.Tags().get("scalars", []):
        return {}
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def _final(run: Path, curves: dict[str, Curve]) -> tuple[dict[str, float], str]:
    """The run's final metrics, flattened to '<split>/<task>/<metric>', and where they came from."""
    path = run / "metrics.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{path}: not valid JSON") from None
        return {f"{s}/{k}": float(v) for s, vals in data.items() if isinstance(vals, dict)
                for k, v in vals.items()}, "metrics.json"
    last = {key: c[max(c)] for key, c in curves.items() if c}
    return last, "last evaluation (no metrics.json yet)"


def _names(runs: list[Path]) -> list[str]:
    """Short labels: the folder name, or the path as given where two runs share a folder name."""
    names = [r.name or str(r) for r in runs]
    return [str(r) if names.count(n) > 1 else n for r, n in zip(runs, names)]


def plot(series: dict[str, dict[str, Curve]], out: Path) -> int:
    """One panel per metric, one line per run; returns the number of panels drawn."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError("report: needs matplotlib (rerun scripts/bootstrap.sh, or pip install "
                         "matplotlib==3.11.2)") from None

    keys = sorted({k for curves in series.values() for k, c in curves.items() if c},  # valid/x beside test/x
                  key=lambda k: (k != "train/loss", k.split("/", 1)[-1], k))
    if not keys:
        return 0
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(5.0 * cols, 3.4 * rows), layout="constrained")
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        for name, curves in series.items():
            curve = curves.get(key)
            if curve:
                steps = sorted(curve)
                ax.plot(steps, [curve[s] for s in steps], marker="o" if len(steps) < 30 else None,
                        markersize=3, label=name)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    handles: dict[str, Artist] = {}  # one legend entry per run, from whichever panel drew it
    for ax in fig.axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="outside upper center", ncols=min(len(handles), 4),
               fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return len(keys)


def table(finals: dict[str, dict[str, float]]) -> str:
    """Final metrics, one row per metric and one column per run ('-' where a run lacks the metric)."""
    keys = sorted({k for f in finals.values() for k in f})
    width = max([len(k) for k in keys] + [6])
    cols = [max(len(n), 8) for n in finals]
    lines = [" " * width + "  " + "  ".join(n.rjust(w) for n, w in zip(finals, cols))]
    for k in keys:
        cells = [f"{f[k]:.4f}" if k in f else "-" for f in finals.values()]
        lines.append(k.ljust(width) + "  " + "  ".join(c.rjust(w) for c, w in zip(cells, cols)))
    return "\n".join(lines)


def report(run_dirs: list[str], out: str, metrics: str | None = None) -> None:
    runs = [Path(r) for r in run_dirs]
    for r in runs:
        if not r.is_dir():
            raise ValueError(f"report: run dir not found: {r}")
        if not any((r / name).exists() for name in ("metrics.json", "metrics_history.jsonl", "tb")):
            raise ValueError(f"report: {r} holds no metrics.json, metrics_history.jsonl or tb/ "
                             "(is it a `trec-rank train --run-dir`?)")
    wanted = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else []
    series, finals = {}, {}
    for run, name in zip(runs, _names(runs)):
        curves = _history(run)
        final, source = _final(run, curves)
        curves["train/loss"] = _train_loss(run)
        if wanted:
            curves = {k: c for k, c in curves.items() if k == "train/loss" or k.rsplit("/", 1)[-1] in wanted}
            final = {k: v for k, v in final.items() if k.rsplit("/", 1)[-1] in wanted}
        series[name], finals[name] = curves, final
        if source != "metrics.json":
            print(f"{name}: {source}")
    panels = plot(series, Path(out))
    print(table(finals))
    print(f"wrote {out} ({panels} panels)" if panels else "no curves to draw (no history and no tb/ events)")


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    """Add `trec-rank report` to the top-level subparsers."""
    r = sub.add_parser("report", help="plot training loss and eval metrics of runs (PNG) and print their "
                                      "final metrics side by side")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories of `trec-rank train`")
    r.add_argument("--out", default="report.png", help="PNG to write (default: report.png)")
    r.add_argument("--metrics", metavar="NAME,NAME", help="only these metric names, e.g. auc,logloss "
                   "(default: every metric; train/loss is always drawn)")
    r.set_defaults(func=lambda args: report(args.run_dirs, args.out, args.metrics))
