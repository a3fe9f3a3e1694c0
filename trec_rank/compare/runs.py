"""Runs -> per-run statistics over shared units, after checking every run was evaluated on the same split.

Retrieval: the units are the split's users; every run must hold exactly the same (user, target)
pairs (same sequences, same leave-one-out split). Ranking: the units are data.group_by's groups
(users on ml-100k; each row is its own group when there is none); every run must hold the same
(task, row, group, label) rows. Anything else is refused with one line naming the run: a paired
interval between runs on different users would pair the wrong things.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trec_rank.compare.bootstrap import Statistic, auc_statistic, mean_statistic, ratio_statistic
from trec_rank.runtime.eval_rows import read_rows

RETRIEVAL_KEYS = ("split", "user", "target", "rank")
EPS = 1e-7  # logloss clamp of probabilities, as float32 BCE on logits sees them


@dataclass
class RunSet:
    """Every run of both sides on one split: statistics per metric, in one shared unit space."""

    kind: str
    units: int  # users (retrieval) or groups (ranking)
    width: int  # the widest per-resample array a statistic builds (rows, for AUC)
    metrics: list[str]  # shared by every run, in a stable order
    stats: list[dict[str, Statistic]]  # per run (A runs first, then B runs)


def _split(table: pa.Table, split: str, run: Path) -> pa.Table:
    part = table.filter(pc.equal(table["split"], split))
    if part.num_rows == 0:
        have = sorted(set(table["split"].to_pylist()))
        raise ValueError(f"{run}: no eval rows for split '{split}' (it has {', '.join(have)})")
    return part


def _retrieval(tables: list[pa.Table], runs: Sequence[Path]) -> RunSet:
    keys = [np.stack([t["user"].to_numpy(), t["target"].to_numpy()]) for t in tables]
    for run, k in zip(runs[1:], keys[1:], strict=True):
        if k.shape != keys[0].shape or not np.array_equal(k, keys[0]):
            raise ValueError(f"{run}: not on the same split as {runs[0]} (users or held-out targets differ); "
                             "compare runs only on the same data and split")
    shared = [c for c in tables[0].column_names if c not in RETRIEVAL_KEYS]
    for t in tables[1:]:
        shared = [c for c in shared if c in t.column_names]
    stats = [{m: mean_statistic(t[m].to_numpy().astype(np.float64)) for m in shared} for t in tables]
    return RunSet("retrieval", len(keys[0][0]), 0, shared, stats)


def _ranking_stats(task: pa.Table, unit: np.ndarray, units: int, name: str) -> dict[str, Statistic]:
    score = task["score"].to_numpy().astype(np.float64)
    label = task["label"].to_numpy().astype(np.float64)
    p = np.clip(score, EPS, 1 - EPS)
    bce = -(label * np.log(p) + (1 - label) * np.log(1 - p))
    rows = np.bincount(unit, minlength=units).astype(np.float64)
    out = {f"{name}/auc": auc_statistic(score, label, unit),
           f"{name}/logloss": ratio_statistic(np.bincount(unit, bce, units), rows)}
    # GAUC: per-group AUC weighted by the group's rows, over groups with both classes
    pos = np.bincount(unit, label > 0.5, units)
    gauc = np.zeros(units)
    both = (pos > 0) & (pos < rows)
    if both.any():
        from trec_rank.runtime.metrics import grouped_auc  # the exact per-group AUC metrics.json uses

        keep = both[unit]
        gauc[both], _ = grouped_auc(unit[keep], score[keep], label[keep])
        out[f"{name}/gauc"] = ratio_statistic(gauc * rows * both, rows * both)
    return out


def _ranking(tables: list[pa.Table], runs: Sequence[Path]) -> RunSet:
    tables = [t.sort_by([("task", "ascending"), ("row", "ascending")]) for t in tables]
    first = tables[0]
    for run, t in zip(runs[1:], tables[1:], strict=True):
        same = t.num_rows == first.num_rows and all(t[c].equals(first[c]) for c in ("task", "row", "group", "label"))
        if not same:
            raise ValueError(f"{run}: not on the same split as {runs[0]} (rows, groups or labels differ); "
                             "compare runs only on the same data and split")
    groups, unit = np.unique(first["group"].to_numpy(), return_inverse=True)
    tasks = sorted(set(first["task"].to_pylist()))
    task_of = first["task"].to_numpy(zero_copy_only=False)
    stats = []
    for t in tables:
        per = {}
        for name in tasks:
            mask = task_of == name
            per.update(_ranking_stats(t.filter(pa.array(mask)), unit[mask], len(groups), name))
        stats.append(per)
    metrics = [m for m in stats[0] if all(m in s for s in stats)]
    return RunSet("ranking", len(groups), first.num_rows, metrics, stats)


def load_runs(runs: Sequence[str | Path], split: str) -> RunSet:
    """Read every run's eval rows for `split`; ValueError (one line) when kinds or splits differ."""
    paths = [Path(r) for r in runs]
    read = [read_rows(p) for p in paths]
    kinds = {k for k, _ in read}
    if len(kinds) > 1:
        raise ValueError(f"runs mix retrieval and ranking results ({', '.join(map(str, paths))}); "
                         "compare like with like")
    tables = [_split(t, split, p) for p, (_, t) in zip(paths, read, strict=True)]
    return _retrieval(tables, paths) if kinds == {"retrieval"} else _ranking(tables, paths)
