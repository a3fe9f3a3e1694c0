"""Per-user (retrieval) and per-row (ranking) evaluation results, kept next to metrics.json.

metrics.json holds averages; two runs' averages cannot say whether their difference is more than
the noise of one test set. `RUN_DIR/eval_rows.parquet` keeps what the averages are averages of, so
`trec-rank compare` can pair two runs user by user (or group by group) on the same split:

  retrieval (one row per evaluated user and split; the best validation epoch's, as metrics.json):
      split string, user int64 (row in the sequence files), target int64 (the held-out item),
      rank int64 (1 = best), one float64 column per metric (hr@k, ndcg@k, mrr)
  ranking (one row per eval row, task and split; the model metrics.json reports):
      split string, task string, row int64 (the dataset's row_index), group int64 (data.group_by's id,
      or the row itself when there is none), score float32 (sigmoid of the logit), label float32

The file's schema metadata says which (`trec_rank.kind`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

ROWS_FILE = "eval_rows.parquet"
KIND_KEY = b"trec_rank.kind"


class EvalResult(dict):
    """A split's metrics (str -> float, what metrics.json shows) that also carries the per-user rows
    they average (column -> [n] array). A dict, so every existing reader of the metrics is unchanged."""

    def __init__(self, metrics: dict[str, float], rows: dict[str, np.ndarray]) -> None:
        super().__init__(metrics)
        self.rows = rows


def retrieval_table(results: dict[str, dict]) -> pa.Table | None:
    """{split: EvalResult} -> the retrieval rows table (None when no split carries rows)."""
    parts = []
    for split, result in results.items():
        rows = getattr(result, "rows", None)
        if rows is None:
            continue
        cols = {"split": pa.array([split] * len(rows["user"]), pa.string())}
        cols.update({k: pa.array(v) for k, v in rows.items()})
        parts.append(pa.table(cols))
    if not parts:
        return None
    return pa.concat_tables(parts).replace_schema_metadata({KIND_KEY: b"retrieval"})


def ranking_table(split_rows: dict[str, dict[str, np.ndarray]]) -> pa.Table:
    """{split: {"task", "row", "group", "score", "label"} arrays} -> the ranking rows table."""
    parts = [pa.table({"split": pa.array([split] * len(r["row"]), pa.string()),
                       "task": pa.array(r["task"], pa.string()), "row": pa.array(r["row"], pa.int64()),
                       "group": pa.array(r["group"], pa.int64()), "score": pa.array(r["score"], pa.float32()),
                       "label": pa.array(r["label"], pa.float32())}) for split, r in split_rows.items()]
    return pa.concat_tables(parts).replace_schema_metadata({KIND_KEY: b"ranking"})


def write_table(run_dir: str | Path, table: pa.Table | None) -> Path | None:
    """Atomically (temporary name, then rename) write RUN_DIR/eval_rows.parquet; None: nothing to write."""
    if table is None:
        return None
    path = Path(run_dir) / ROWS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def write_retrieval_rows(run_dir: str | Path, results: dict[str, dict]) -> Path | None:
    """Call where a retrieval run's reported metrics are fixed (the best validation epoch, or an eval)."""
    return write_table(run_dir, retrieval_table(results))


def read_rows(run: str | Path) -> tuple[str, pa.Table]:
    """(kind, table) of a run directory's eval rows; ValueError naming the file when missing or unreadable."""
    path = Path(run) / ROWS_FILE
    if not path.is_file():
        raise ValueError(f"{path}: no per-user eval rows (runs trained before `trec-rank compare` existed "
                         f"have none: re-evaluate with `trec-rank eval CONFIG --checkpoint RUN/best`)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
    kind = (table.schema.metadata or {}).get(KIND_KEY, b"").decode()
    if kind not in ("retrieval", "ranking"):
        raise ValueError(f"{path}: schema metadata {KIND_KEY.decode()} is {kind!r}, not retrieval or ranking")
    return kind, table



class RankingRows:
    """The rows of one ranking evaluation, collected while it runs (no second scoring pass).

    `add` keeps, per batch, each real row's dataset row_index, group id, and every task's score and
    label; `write` gathers them from every rank (a collective: call it on all ranks) and rank 0 writes
    RUN_DIR/eval_rows.parquet."""

    def __init__(self, tasks: list[str]) -> None:
        self.tasks = tasks
        self.cols: dict[str, dict[str, list[np.ndarray]]] = {}

    def add(self, split: str, rows: torch.Tensor, groups: torch.Tensor | None, logits: dict[str, torch.Tensor],
            labels: dict[str, torch.Tensor], keep: torch.Tensor) -> None:
        """rows [B] int (dataset row_index), groups [B] or None (the row is its own group), logits and
        labels {task: [B]}, keep [B] bool (False: a padding row of a short rank)."""
        cols = self.cols.setdefault(split, {k: [] for k in ("task", "row", "group", "score", "label")})
        row = rows[keep].cpu().numpy()
        group = row if groups is None else groups[keep].cpu().numpy()
        for task in self.tasks:
            cols["task"].append(np.full(len(row), task, dtype=object))
            cols["row"].append(row)
            cols["group"].append(group)
            cols["score"].append(torch.sigmoid(logits[task][keep].float()).cpu().numpy())
            cols["label"].append(labels[task][keep].float().cpu().numpy())

    def write(self, run_dir: str | Path, is_main: bool) -> Path | None:
        local = {split: {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
                 for split, cols in self.cols.items()}
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local)
            local = {split: {k: np.concatenate([p[split][k] for p in parts]) for k in cols}
                     for split, cols in local.items()}
        return write_table(run_dir, ranking_table(local)) if is_main and local else None
