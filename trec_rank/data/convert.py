"""Arrow columns -> Batch tensors, vectorised, with the checks that keep bad rows out.

Ids come straight from Arrow list offsets/values through numpy (no Python loop per row). Every
chunk is checked as it is converted (nulls inside id lists, negative ids, out-of-range ids under
policy `error`, side columns that do not align with their ids, side values a model reads as embedding
indices outside their bound (`SideBounds`), labels that are not 0/1), so a bad
row group can never reach a training step, whether or not the dataset was fully scanned when it
was opened.

String ids (`oov: hash` only) become rows through `string_hash`: BLAKE2b (RFC 7693, Python's
`hashlib`) with an 8-byte digest, read as a little-endian uint64, modulo the table size. The digest
is fixed by the standard, unkeyed and independent of the process, machine and library versions, so
training, scoring and any later run map a string to the same row. (Python's `hash()` is salted per
process; pandas' and Arrow's hashes are implementation details that may change between releases.)
Each chunk's distinct strings are hashed once (Arrow dictionary encoding), not every occurrence.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from trec_rank.config.schema import FeatureConfig, Schema
from trec_rank.data.batch import Batch


class DataError(ValueError):
    """Bad input data; the message names the file, column and row group."""


SideBounds = Mapping[str, tuple[int, str]]  # Batch.side key -> (bound, config key): values in [0, bound)


def expected_columns(schema: Schema, with_labels: bool = True) -> list[str]:
    """Parquet columns the schema reads, in a stable order."""
    cols: list[str] = []
    for f in schema.features:
        if f.kind == "label" and not with_labels:
            continue
        cols.append(f.column)
        cols.extend(f.side.values())
    return list(dict.fromkeys(cols))


def check_arrow_types(schema: Schema, arrow_schema: pa.Schema, where: str, with_labels: bool = True) -> None:
    """Reject missing columns and wrong Arrow types using only file metadata."""
    for f in schema.features:
        if f.kind == "label" and not with_labels:
            continue
        for col, role in [(f.column, f.kind), *[(c, "side") for c in f.side.values()]]:
            idx = arrow_schema.get_field_index(col)
            if idx < 0:
                raise DataError(f"{where}: missing column '{col}' (feature '{f.name}', kind {f.kind})")
            t = arrow_schema.field(idx).type
            ok = _type_ok(role, t, f)
            if not ok:
                raise DataError(f"{where}: column '{col}' has Arrow type {t}, expected {_expected(role, f)}")


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) \
        or pa.types.is_large_binary(t)


def _id_ok(t: pa.DataType, f: FeatureConfig) -> bool:
    """Integer ids always; string ids only where `oov: hash` says how to map them to rows."""
    return pa.types.is_integer(t) or (_is_text(t) and f.oov == "hash")


def _type_ok(role: str, t: pa.DataType, f: FeatureConfig) -> bool:
    if role in ("dense", "label"):
        return pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_boolean(t)
    if role == "side":
        return _is_list(t) and (pa.types.is_integer(t.value_type) or pa.types.is_floating(t.value_type))
    if role == "sequence":
        return _is_list(t) and _id_ok(t.value_type, f)
    return _id_ok(t, f) or (_is_list(t) and _id_ok(t.value_type, f))


def _expected(role: str, f: FeatureConfig) -> str:
    text = "" if role in ("dense", "label", "side") else " (string ids need `oov: hash` on the feature)"
    return {"dense": "a numeric type", "label": "a numeric type", "side": "list<numeric>",
            "sequence": "list<int>"}.get(role, "int or list<int>") + text


def string_hash(values: pa.Array) -> np.ndarray:
    """uint64 [len(values)]: BLAKE2b-64 of each string's UTF-8 bytes (see the module docstring)."""
    encoded = pc.dictionary_encode(values)
    distinct = pc.cast(encoded.dictionary, pa.large_binary()).to_pylist()
    digests = np.fromiter((int.from_bytes(hashlib.blake2b(v, digest_size=8).digest(), "little") for v in distinct),
                          dtype=np.uint64, count=len(distinct))
    return digests[encoded.indices.to_numpy(zero_copy_only=False)]


def _id_values(arr: pa.Array) -> np.ndarray:
    """Integer ids as numpy (int64/uint64 as stored), string ids as their uint64 hashes."""
    if _is_text(arr.type):
        return string_hash(arr)
    return arr.to_numpy(zero_copy_only=False, writable=True)


def _jagged(arr: pa.Array, where: str, col: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, lengths) of a list or scalar id column; null lists count as empty."""
    if _is_list(arr.type):
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False, writable=True)
        flat = pc.list_flatten(arr)
        if flat.null_count:
            raise DataError(f"{where}: column '{col}' has {flat.null_count} null value(s) inside its lists")
        return _id_values(flat), lengths.astype(np.int64)
    if arr.null_count:
        raise DataError(f"{where}: column '{col}' has {arr.null_count} null id(s)")
    values = _id_values(arr)
    return values, np.ones(len(values), dtype=np.int64)


def _keep_last(lengths: np.ndarray, max_len: int) -> tuple[np.ndarray | None, np.ndarray]:
    """Index of the values to keep so each row holds at most its last `max_len` items."""
    if max_len <= 0 or len(lengths) == 0 or lengths.max(initial=0) <= max_len:
        return None, lengths
    new = np.minimum(lengths, max_len)
    ends = np.cumsum(lengths)
    starts = ends - new
    out_starts = np.cumsum(new) - new
    idx = np.arange(new.sum(), dtype=np.int64) - np.repeat(out_starts, new) + np.repeat(starts, new)
    return idx, new


def apply_oov_policy(ids: np.ndarray, f: FeatureConfig, n: int, where: str) -> np.ndarray:
    """Table rows (int64) of raw ids: integers (any width, unsigned included), string hashes (uint64,
    from `string_hash`) or strings themselves (an object array, e.g. Arrow `value_counts` keys)."""
    if ids.dtype == object:
        ids = string_hash(pa.array(ids))
    if ids.size == 0:
        return ids.astype(np.int64)
    negative = ids.dtype.kind == "i" and ids.min() < 0
    if negative and f.oov != "hash":
        bad = ids[ids < 0][0]
        raise DataError(f"{where}: column '{f.column}' has negative id {bad} (only `oov: hash` maps negative ids)")
    if not negative and ids.max() < n:
        return ids.astype(np.int64, copy=False)
    if f.oov == "error":
        bad = ids[ids >= n][0]
        raise DataError(f"{where}: column '{f.column}' has id {bad} outside [0, {n}) of table "
                        f"'{f.table}' (oov policy 'error'; use 'hash' or 'oov_row', or raise num_embeddings)")
    if f.oov == "hash":  # numpy's % is non-negative for n > 0; in the ids' own dtype so uint64 never wraps
        return (ids % ids.dtype.type(n)).astype(np.int64)
    return np.where(ids >= n, n, ids).astype(np.int64)  # oov_row: the extra row appended after the n real rows


def _kjt(parts: list[tuple[str, np.ndarray, np.ndarray]], rows: int) -> KeyedJaggedTensor:
    if not parts:
        return KeyedJaggedTensor(keys=[], values=torch.empty(0, dtype=torch.long),
                                 lengths=torch.empty(0, dtype=torch.int32), stride=rows)
    values = torch.from_numpy(np.concatenate([v for _, v, _ in parts]))
    lengths = torch.from_numpy(np.concatenate([ln for _, _, ln in parts]).astype(np.int32))
    return KeyedJaggedTensor(keys=[k for k, _, _ in parts], values=values, lengths=lengths, stride=rows)


def _numeric(table: pa.Table, col: str, where: str, first_row: int) -> np.ndarray:
    arr = table.column(col).combine_chunks()
    if arr.null_count:
        raise DataError(f"{where}: column '{col}' has {arr.null_count} null value(s)")
    values = arr.to_numpy(zero_copy_only=False, writable=True).astype(np.float32, copy=False)
    bad = ~np.isfinite(values)
    if bad.any():
        raise DataError(f"{where}: column '{col}' has {int(bad.sum())} non-finite value(s) (NaN/inf), "
                        f"first at row {first_row + int(np.argmax(bad))}")
    return values


def _label(table: pa.Table, f: FeatureConfig, where: str, first_row: int) -> np.ndarray:
    """A task's labels: 0/1 only. Every task is trained with binary cross-entropy and scored by AUC, which
    accept any float without complaint, so a rating of 4.0 in a label column would train silently."""
    values = _numeric(table, f.column, where, first_row)
    bad = (values != 0) & (values != 1)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(f"{where}: label column '{f.column}' holds {values[row]:g} at row {first_row + row}; "
                        f"labels must be 0 or 1 (every task is binary: there is no regression loss), e.g. "
                        f"derive a 0/1 column such as like = rating >= 4")
    return values


class _Jagged(NamedTuple):
    values: np.ndarray  # [N] ids (or side values), all rows end to end
    lengths: np.ndarray  # [rows] int64
    offsets: np.ndarray  # [rows + 1] int64, offsets[i] = start of row i in values


def _with_offsets(values: np.ndarray, lengths: np.ndarray) -> _Jagged:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return _Jagged(values, lengths, offsets)


class _Columns(NamedTuple):
    """A chunk's columns, converted and checked once; batches are row ranges of it."""

    sparse: list[tuple[str, _Jagged]]
    sequence: list[tuple[str, _Jagged]]
    side: dict[str, tuple[str, np.ndarray]]  # "<feature>/<side>" -> (feature, values aligned with its ids)
    dense: np.ndarray  # [rows, n_dense] float32
    labels: dict[str, np.ndarray]  # task -> [rows] float32


def _check_bound(values: np.ndarray, offsets: np.ndarray, bound: tuple[int, str], col: str, where: str,
                 first_row: int) -> None:
    """Side values (as the model's int64 indices) must lie in [0, bound); offsets [rows + 1] name the row."""
    n, key = bound
    ints = values.astype(np.int64, copy=False)
    bad = (ints < 0) | (ints >= n)
    if bad.any():
        k = int(np.argmax(bad))
        row = int(np.searchsorted(offsets, k, side="right")) - 1
        raise DataError(f"{where}: side column '{col}' holds {values[k]} at row {first_row + row}, outside "
                        f"[0, {n}) ({key})")


def _columns(table: pa.Table, schema: Schema, where: str, with_labels: bool, first_row: int,
             side_bounds: SideBounds) -> _Columns:
    """`where` names the chunk; row numbers in messages are `first_row` + the row within the chunk."""
    sparse: list[tuple[str, _Jagged]] = []
    sequence: list[tuple[str, _Jagged]] = []
    side: dict[str, tuple[str, np.ndarray]] = {}
    seq_names = {f.name for f in schema.sequence_features}
    for f in schema.features:
        if f.kind not in ("sparse", "sequence"):
            continue
        values, full = _jagged(table.column(f.column).combine_chunks(), where, f.column)
        keep, lengths = _keep_last(full, f.max_len)
        values = apply_oov_policy(values if keep is None else values[keep], f, schema.table(f.table).num_embeddings,
                                  where)
        jagged = _with_offsets(values, lengths)
        (sequence if f.name in seq_names else sparse).append((f.name, jagged))
        for side_name, col in f.side.items():
            s_values, s_lengths = _jagged(table.column(col).combine_chunks(), where, col)
            if not np.array_equal(s_lengths, full):
                row = int(np.nonzero(s_lengths != full)[0][0])
                raise DataError(f"{where}: side column '{col}' does not align with '{f.column}' at row "
                                f"{first_row + row} "
                                f"({s_lengths[row]} vs {full[row]} elements)")
            key = f"{f.name}/{side_name}"
            side[key] = (f.name, s_values if keep is None else s_values[keep])
            if key in side_bounds:
                _check_bound(side[key][1], jagged.offsets, side_bounds[key], col, where, first_row)
    dense_cols = [_numeric(table, f.column, where, first_row) for f in schema.dense]
    dense = np.stack(dense_cols, axis=1) if dense_cols else np.zeros((table.num_rows, 0), dtype=np.float32)
    labels = {f.name: _label(table, f, where, first_row) for f in schema.labels} if with_labels else {}
    return _Columns(sparse, sequence, side, dense, labels)


def _rows(cols: _Columns, lo: int, hi: int, row_index: np.ndarray) -> Batch:
    """Rows [lo, hi) of converted columns as a Batch (copies: batches never share storage)."""
    def cut(parts: list[tuple[str, _Jagged]]) -> list[tuple[str, np.ndarray, np.ndarray]]:
        return [(n, j.values[j.offsets[lo]:j.offsets[hi]], j.lengths[lo:hi]) for n, j in parts]

    jagged = dict(cols.sparse + cols.sequence)
    side = {}
    for key, (feature, values) in cols.side.items():
        off = jagged[feature].offsets
        side[key] = torch.from_numpy(values[off[lo]:off[hi]].copy())
    return Batch(
        dense=torch.from_numpy(np.ascontiguousarray(cols.dense[lo:hi]).copy()),
        sparse=_kjt(cut(cols.sparse), hi - lo),
        sequence=_kjt(cut(cols.sequence), hi - lo),
        side=side,
        labels={k: torch.from_numpy(v[lo:hi].copy()) for k, v in cols.labels.items()},
        weights=torch.ones(hi - lo),
        row_index=torch.from_numpy(row_index[lo:hi].astype(np.int64)),
        host_lengths={n: torch.from_numpy(j.lengths[lo:hi].astype(np.int64)) for n, j in cols.sequence},
    )


def to_batch(table: pa.Table, schema: Schema, row_index: np.ndarray, where: str,
             with_labels: bool = True, first_row: int = 0, side_bounds: SideBounds | None = None) -> Batch:
    """Convert a chunk of rows (already validated for types) into a Batch; `where` names its origin and
    `first_row` is the chunk's first row there (so messages name the row in the file)."""
    cols = _columns(table, schema, where, with_labels, first_row, side_bounds or {})
    return _rows(cols, 0, table.num_rows, row_index)


def to_batches(table: pa.Table, schema: Schema, row_index: np.ndarray, where: str, batch_size: int,
               drop_last: bool, with_labels: bool = True, side_bounds: SideBounds | None = None) -> list[Batch]:
    """Consecutive batches of `batch_size` rows, identical to `to_batch` on each slice.

    The columns are converted (and checked) once for the whole chunk and then cut by row range:
    Arrow's per-call overhead over ~20 columns, paid once per batch before, was a visible part
    of a DIN training step."""
    cols = _columns(table, schema, where, with_labels, 0, side_bounds or {})
    rows, out = table.num_rows, []
    for lo in range(0, rows, batch_size):
        hi = min(lo + batch_size, rows)
        if hi - lo < batch_size and drop_last:
            break
        out.append(_rows(cols, lo, hi, row_index))
    return out
