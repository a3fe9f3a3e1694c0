"""Id frequencies n_j in the training split, per embedding table, for DIN's mini-batch-aware L2.

Counting reads Parquet, so it is the data layer's: the trainer hands `train_id_counts(cfg)` to the model.

n_j counts every occurrence of row j in any column that reads the table (the target item and the
history lists of the item table alike), after the loader's OOV policy maps raw ids to rows. The
scan is one pass of pyarrow `value_counts` per column and file; the result is cached as
`<train split>/_id_counts.json` (the loader skips names starting with '_') and reused while the
split's files (name, size, mtime) and the counted columns are unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from trec_rank.config.encoder import EncoderParams
from trec_rank.config.experiment import ExperimentConfig
from trec_rank.config.schema import Schema
from trec_rank.data.convert import apply_oov_policy
from trec_rank.data.dataset import list_parquet_files

log = logging.getLogger(__name__)
CACHE_NAME = "_id_counts.json"


def train_id_counts(cfg: ExperimentConfig) -> dict[str, np.ndarray] | None:
    """Counts over the train split of the tables the model's mini-batch-aware L2 reads (None: no L2)."""
    encoder = getattr(cfg.model.typed_params, "encoder", None)
    if not isinstance(encoder, EncoderParams) or encoder.l2.weight <= 0:
        return None
    tables = encoder.l2.counted_tables(cfg.schema)
    return id_counts(cfg.schema, cfg.data.split_path(cfg.data.train_split), tables)


def _cache_key(schema: Schema, split_dir: Path, files: list[str], tables: list[str]) -> dict:
    stats = [[str(Path(f).relative_to(split_dir)), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]
    columns = {t: sorted(f.column for f in schema.features if f.table == t) for t in tables}
    return {"files": stats, "columns": columns, "rows": {t: schema.table_rows(t) for t in tables}}


def _count_table(schema: Schema, table: str, files: list[str]) -> np.ndarray:
    rows = schema.table_rows(table)
    counts = np.zeros(rows, dtype=np.int64)
    for f in (f for f in schema.features if f.table == table):
        for path in files:
            col = pq.read_table(path, columns=[f.column]).column(f.column)
            if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                col = pc.list_flatten(col)
            col = col.drop_null()
            if len(col) == 0:
                continue
            vc = pc.value_counts(col)
            ids = vc.field("values").to_numpy(zero_copy_only=False)
            rows_of = apply_oov_policy(ids, f, schema.table(table).num_embeddings, f"{path} (counting ids)")
            np.add.at(counts, rows_of, vc.field("counts").to_numpy(zero_copy_only=False))
    return counts


def _write_atomic(path: Path, payload: dict) -> None:
    """Write-then-rename: ranks counting concurrently never leave a torn file."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".id_counts.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh)
        os.replace(tmp, path)
    except OSError as err:  # read-only data directories still train; they just recount next time
        log.warning("could not cache id counts in %s: %s", path, err)


def id_counts(schema: Schema, split_dir: str | Path, tables: list[str]) -> dict[str, np.ndarray]:
    """table -> int64 counts [table_rows]: occurrences of each row in the split's columns."""
    split_dir = Path(split_dir)
    files = list_parquet_files(split_dir)
    key = _cache_key(schema, split_dir, files, tables)
    cache = split_dir / CACHE_NAME
    if cache.is_file():
        try:
            stored = json.loads(cache.read_text())
        except (OSError, json.JSONDecodeError):
            stored = {}
        if stored.get("key") == key:
            return {t: _dense(stored["tables"][t], key["rows"][t]) for t in tables}
    counts = {t: _count_table(schema, t, files) for t in tables}
    sparse = {t: {"ids": np.flatnonzero(c).tolist(), "counts": c[c > 0].tolist()} for t, c in counts.items()}
    _write_atomic(cache, {"key": key, "tables": sparse})
    log.info("counted ids of tables %s in %s", ", ".join(tables), split_dir)
    return counts


def _dense(stored: dict, rows: int) -> np.ndarray:
    out = np.zeros(rows, dtype=np.int64)
    out[np.asarray(stored["ids"], dtype=np.int64)] = np.asarray(stored["counts"], dtype=np.int64)
    return out
