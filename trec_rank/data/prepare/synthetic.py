"""Synthetic Parquet data for any Schema: load tests, planner/sharding runs and smoke training.

Data is generated in chunks of CHUNK_ROWS rows and streamed to disk, so 10M+ rows use flat memory,
and ids are drawn without any per-id table, so num_embeddings ~1e9 works.

Per feature kind (a column shared by several features is generated once, by the first):
- sparse: int64 id, power-law: id = floor((N+1) ** u) - 1 with u ~ U[0,1), N = num_embeddings,
  i.e. log-uniform (Zipf exponent ~1): small ids are hot, the tail reaches N-1. A sparse feature
  whose name ends with `_list` or that has max_len > 0 is list<int64> of 1..max(1, max_len) ids.
- sequence: list<int64> of length uniform in [0, max_len]; each side column is list<int64>
  aligned with it: sides named like time/ts hold strictly increasing timestamps, others 1..5.
- dense: float32 standard normal. label: float32 0/1 from the planted signal below.

Planted signal (a model can learn it, so training curves mean something): each id has a fixed
weight w(id) = ((id * 2654435761) % 1000) / 1000 - 0.5, computed in uint64 (exact for ids below
~6.9e9), no table. logit = sum of w(first id of the row) over the first 3 sparse features
+ 0.5 * first dense feature; every label ~ Bernoulli(sigmoid(2 * logit)), drawn independently.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from trec_rank.config.schema import FeatureConfig, Schema
from trec_rank.config.typed import to_dict
from trec_rank.data.prepare.common import SplitWriter, Stats, columns_entry, list_array, write_manifest

CHUNK_ROWS = 200_000
SPLITS = ("train", "valid", "test")
SIGNAL = ("w(id) = ((id * 2654435761) % 1000) / 1000 - 0.5 (uint64); logit = sum of w(first id) over the "
          "first 3 sparse features + 0.5 * first dense feature; label ~ Bernoulli(sigmoid(2 * logit))")


def weight(ids: np.ndarray) -> np.ndarray:
    """The planted per-id weight w(id) in [-0.5, 0.5) (public so tests and demos can reuse it)."""
    return (ids.astype(np.uint64) * np.uint64(2654435761) % np.uint64(1000)).astype(np.float64) / 1000 - 0.5


def _zipf(rng: np.random.Generator, size: int, n: int) -> np.ndarray:
    ids = np.exp(rng.random(size) * np.log(n + 1.0)).astype(np.int64) - 1
    return np.minimum(ids, n - 1)


def _is_list(f: FeatureConfig) -> bool:
    return f.kind == "sequence" or (f.kind == "sparse" and (f.name.endswith("_list") or f.max_len > 0))


def _plan(schema: Schema) -> tuple[pa.Schema, list[tuple[str, FeatureConfig]]]:
    """Arrow schema plus the (column, feature) that generates each column, in schema order."""
    fields, plan, seen = [], [], set()
    for f in schema.features:
        for col, kind in [(f.column, f.kind), *[(c, "side") for c in f.side.values()]]:
            if col in seen:
                continue
            seen.add(col)
            if kind == "side":
                fields.append(pa.field(col, pa.list_(pa.int64())))
                continue
            plan.append((col, f))
            typ = pa.float32() if kind in ("dense", "label") else pa.int64()
            fields.append(pa.field(col, pa.list_(typ) if _is_list(f) else typ))
    return pa.schema(fields), plan


def _chunk(schema: Schema, plan: list, arrow: pa.Schema, n: int, rng: np.random.Generator) -> pa.Table:
    cols: dict[str, object] = {}
    logit = np.zeros(n)
    sparse_seen = dense_seen = 0
    for col, f in plan:
        if f.kind in ("sparse", "sequence"):
            size = schema.table(f.table).num_embeddings
            if not _is_list(f):
                ids = _zipf(rng, n, size)
                first: np.ndarray | None = ids
                cols[col] = ids
            else:
                lo, hi = (0, f.max_len) if f.kind == "sequence" else (1, max(1, f.max_len))
                lengths = rng.integers(lo, hi + 1, n)
                off = np.concatenate([[0], np.cumsum(lengths)])
                ids = _zipf(rng, int(off[-1]), size)
                first = ids[off[:-1]] if f.kind == "sparse" else None  # sparse lists hold >= 1 id
                cols[col] = list_array(off, ids)
                for side_name, side_col in f.side.items():
                    if side_col not in cols:
                        cols[side_col] = _side(side_name, lengths, off, rng)
            if f.kind == "sparse" and sparse_seen < 3:
                assert first is not None
                logit += weight(first)
                sparse_seen += 1
        elif f.kind == "dense":
            dense = rng.standard_normal(n, dtype=np.float32)
            cols[col] = dense
            if not dense_seen:
                logit += 0.5 * dense
                dense_seen = 1
    p = 1.0 / (1.0 + np.exp(-2.0 * logit))
    for col, f in plan:
        if f.kind == "label":
            cols[col] = (rng.random(n) < p).astype(np.float32)
    return pa.table({name: cols[name] for name in arrow.names}).cast(arrow)


def _side(name: str, lengths: np.ndarray, off: np.ndarray, rng: np.random.Generator) -> pa.ListArray:
    total = int(off[-1])
    if "time" in name.lower() or name.lower() in ("ts", "hist_ts"):
        row = np.repeat(np.arange(len(lengths)), lengths)
        steps = np.cumsum(rng.integers(1, 3600, total))
        before = np.concatenate([[0], steps])[off[:-1]]  # cumulative steps before each row's first value
        base = rng.integers(1_500_000_000, 1_600_000_000, len(lengths))
        return list_array(off, base[row] + steps - before[row])
    return list_array(off, rng.integers(1, 6, total))


def prepare_synthetic(schema: Schema, rows: int, out: Path, seed: int = 0) -> dict:
    """Write out/{train,valid,test} (80/10/10 by row index) in CHUNK_ROWS files; returns the manifest."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    out = Path(out)
    arrow, plan = _plan(schema)
    labels = [col for col, f in plan if f.kind == "label"]
    rng = np.random.default_rng(seed)
    stats, files = Stats(labels), {}
    bounds = [0, int(0.8 * rows), int(0.9 * rows), rows]
    for split, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:]):
        writer = SplitWriter(out / split, arrow, rows_per_file=CHUNK_ROWS)
        for a in range(lo, hi, CHUNK_ROWS):
            table = _chunk(schema, plan, arrow, min(CHUNK_ROWS, hi - a), rng)
            writer.write(table)
            stats.update(split, table)
        files[split] = writer.close()
    manifest = {"format": 1, "dataset": "synthetic", "source": "synthetic",
                "params": {"rows": rows, "seed": seed, "chunk_rows": CHUNK_ROWS},
                "splits": stats.splits_entry(files), "columns": columns_entry(arrow),
                "id_ranges": stats.ranges,
                "tables": {t.name: t.num_embeddings for t in schema.tables}, "signal": SIGNAL,
                "schema": to_dict(schema)}
    write_manifest(out, manifest)
    return manifest
