"""JSON rows -> the Arrow columns training reads -> `Batch`, with 400 messages naming the row and the field.

The request is turned into an Arrow table and handed to `data.convert.to_batch`, the function training and
`trec-rank score` use, so string hashing, the oov policy, `max_len` truncation, side alignment and the side
bounds are the same code, not a copy. What is checked here is only what JSON adds: a field that is missing,
unknown or null, and a value of the wrong JSON type for its feature kind.

Types are inferred by Arrow over a whole column at once (C speed); only when that fails is the column walked
row by row, to name the first bad row. JSON types map to the Arrow types training data has: integers ->
int64, strings -> string (ids under `oov: hash` only), numbers -> float32 (dense), lists -> list<...>.
A single-valued sparse id becomes a one-element list: `to_batch` makes the same (values, lengths = 1) of
an int64 column and of a list<int64> column of singletons, and one list type per field lets requests that
send a scalar and a list be merged into one model call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from trec_rank.config.experiment import ExperimentConfig
from trec_rank.config.models import side_bounds
from trec_rank.config.schema import FeatureConfig
from trec_rank.data.batch import Batch
from trec_rank.data.convert import DataError, check_arrow_types, to_batch

_ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError)


class RequestError(ValueError):
    """A client mistake (HTTP 400); the message names the row (0-based position in `rows`) and the field."""


@dataclass(frozen=True)
class Field:
    """One request field: a column of the training data and the role it plays there."""

    name: str  # the Parquet column (the feature's name unless the schema sets `column:`)
    role: str  # "sparse" | "sequence" | "dense" | "side"
    feature: FeatureConfig  # the feature it belongs to (a side column: the history it is aligned with)


def request_fields(cfg: ExperimentConfig) -> list[Field]:
    """The fields every row must carry, in schema order; label columns are not among them."""
    fields: dict[str, Field] = {}
    for f in cfg.schema.features:
        if f.kind == "label":
            continue
        fields.setdefault(f.column, Field(f.column, f.kind, f))
        for col in f.side.values():
            fields.setdefault(col, Field(col, "side", f))
    return list(fields.values())


def _describe(t: pa.DataType) -> str:
    """An Arrow type in JSON words, for messages: 'integer', 'a list of strings', ..."""
    if pa.types.is_list(t):
        inner = t.value_type
        if pa.types.is_null(inner):
            return "an empty list"
        return "a list of lists" if pa.types.is_list(inner) else f"a list of {_describe(inner)}s"
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "number"
    return {pa.string(): "string", pa.bool_(): "boolean", pa.null(): "null"}.get(t, "object")


def _expected(field: Field) -> str:
    ids = "integer ids" + (" or string ids" if field.feature.oov == "hash" else "")
    return {"dense": "a number", "side": "a list of numbers (aligned with '" + field.feature.column + "')",
            "sequence": f"a list of {ids}"}.get(field.role, f"an id or a list of {ids}")


def _id_ok(t: pa.DataType, f: FeatureConfig) -> bool:
    return pa.types.is_integer(t) or pa.types.is_null(t) or (pa.types.is_string(t) and f.oov == "hash")


def _accepts(field: Field, t: pa.DataType) -> bool:
    """Whether an inferred Arrow type is one this field takes (nulls are checked apart)."""
    if field.role == "dense":
        return pa.types.is_integer(t) or pa.types.is_floating(t)
    inner = t.value_type if pa.types.is_list(t) else None
    if field.role == "side":
        return inner is not None and (pa.types.is_integer(inner) or pa.types.is_floating(inner)
                                      or pa.types.is_null(inner))
    if field.role == "sequence":
        return inner is not None and _id_ok(inner, field.feature)
    return _id_ok(inner if inner is not None else t, field.feature) and not pa.types.is_null(t)


def _nulls(arr: pa.Array) -> int:
    return arr.null_count + (arr.flatten().null_count if pa.types.is_list(arr.type) else 0)


def _why(field: Field, value: Any) -> str | None:
    """Why one value does not fit its field, or None."""
    if value is None:
        return f"expected {_expected(field)}, got null"
    try:
        arr = pa.array([value])
    except _ARROW_ERRORS:
        return f"expected {_expected(field)}, got {_short(value)}"
    if not _accepts(field, arr.type):
        base = arr.type.value_type if pa.types.is_list(arr.type) else arr.type
        text = pa.types.is_string(base) and field.role in ("sparse", "sequence")
        hint = "" if not text or field.feature.oov == "hash" else \
            f" (string ids need `oov: hash` on feature '{field.feature.name}', whose policy is '{field.feature.oov}')"
        return f"expected {_expected(field)}, got {_describe(arr.type)} {_short(value)}{hint}"
    if _nulls(arr):
        return f"expected {_expected(field)}, got a null inside the list"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _first_bad(field: Field, values: Sequence[Any]) -> str:
    """The message for the first row whose value is wrong alone, or whose type differs from the rows before."""
    seen: tuple[int, pa.DataType] | None = None
    for i, v in enumerate(values):
        if (why := _why(field, v)) is not None:
            return f"row {i}: field '{field.name}': {why}"
        t = pa.array([v]).type
        base = t.value_type if pa.types.is_list(t) else t
        if pa.types.is_null(base):
            continue
        if seen is not None and (pa.types.is_string(base) != pa.types.is_string(seen[1])):
            return (f"row {i}: field '{field.name}': holds {_describe(base)} ids where row {seen[0]} holds "
                    f"{_describe(seen[1])} ids; one request's ids of a field are all integers or all strings")
        seen = seen or (i, base)
    raise AssertionError(f"field '{field.name}': Arrow refused the column but accepts each row alone")


def _column(field: Field, values: list[Any]) -> pa.Array:
    """One field of every row as the Arrow array training data would hold (see the module docstring)."""
    lists = [v if isinstance(v, list) else [v] for v in values] if field.role == "sparse" else values
    try:
        arr = pa.array(lists)
    except _ARROW_ERRORS:
        raise RequestError(_first_bad(field, values)) from None
    if not _accepts(field, arr.type) or _nulls(arr):
        raise RequestError(_first_bad(field, values))
    if field.role == "dense":
        return arr.cast(pa.float32())
    if pa.types.is_null(arr.type.value_type):  # every list empty: Arrow could not see the element type
        arr = arr.cast(pa.list_(pa.int64()))
    return arr


class RowConverter:
    """Request rows -> Arrow table -> Batch for one model config (`Artifact.config`)."""

    def __init__(self, cfg: ExperimentConfig, max_rows: int, aligned: Sequence[Sequence[str]] = (),
                 single: Sequence[str] = ()) -> None:
        """`aligned`: groups of features the model needs equally long per row (DIN's parallel histories);
        `single`: features it needs to hold exactly one id per row; both from the artifact's input contract."""
        self.cfg, self.max_rows, self.aligned, self.single = cfg, max_rows, aligned, single
        self.fields = request_fields(cfg)
        self.required = {f.name for f in self.fields}
        self.allowed = self.required | {f.column for f in cfg.schema.labels}  # labels may come along, unused
        self.side_bounds = side_bounds(cfg.model.typed_params)

    def table(self, rows: list[dict[str, Any]]) -> pa.Table:
        """The rows as one Arrow table with a column per field (labels dropped); RequestError names the row."""
        if not rows:
            raise RequestError("rows: the list is empty; send at least one row")
        if len(rows) > self.max_rows:
            raise RequestError(f"rows: {len(rows)} rows, more than this server takes per request "
                               f"({self.max_rows}, --max-batch-rows); split the request")
        for i, row in enumerate(rows):
            keys = row.keys()
            if missing := self.required - keys:
                name = next(f.name for f in self.fields if f.name in missing)
                raise RequestError(f"row {i}: missing field '{name}' ({len(missing)} missing; GET /metadata lists "
                                   "the fields)")
            if unknown := keys - self.allowed:
                raise RequestError(f"row {i}: unknown field '{sorted(unknown)[0]}' (the model reads: "
                                   f"{', '.join(sorted(self.required))})")
        table = pa.table({f.name: _column(f, [row[f.name] for row in rows]) for f in self.fields})
        try:
            check_arrow_types(self.cfg.schema, table.schema, "request", with_labels=False)
        except DataError as err:
            raise AssertionError(f"a field passed the JSON checks with a type training refuses: {err}") from None
        return table

    def batch(self, table: pa.Table, locate: bool = True) -> Batch:
        """`to_batch`, as training runs it; a DataError becomes a RequestError naming the first bad row
        (found by bisecting prefixes, since every check is per row; only on the error path)."""
        try:
            batch = self._convert(table, "rows", 0)
        except DataError as err:
            if not locate:
                raise RequestError(str(err)) from None
            first = _error(lambda k: self._convert(table.slice(0, k), "rows", 0), table.num_rows)
            try:
                self._convert(table.slice(first, 1), f"row {first}", first)
            except DataError as one:
                raise RequestError(str(one)) from None
            raise RequestError(str(err)) from None
        self._check_shape(batch)
        return batch

    def _lengths(self, batch: Batch, name: str) -> np.ndarray:
        kjt = batch.sparse if name in batch.sparse.keys() else batch.sequence
        return kjt[name].lengths().numpy()

    def _check_shape(self, batch: Batch) -> None:
        """What the model requires of a row beyond training's data checks (the artifact's contract), as a 400
        naming the row rather than a failure inside the exported program."""
        column = {f.name: f.column for f in self.cfg.schema.features}
        for group in self.aligned:
            lengths = np.stack([self._lengths(batch, f) for f in group])
            if (bad := np.nonzero((lengths != lengths[0]).any(axis=0))[0]).size:
                r = int(bad[0])
                raise RequestError(f"row {r}: fields {', '.join(repr(column[f]) for f in group)} hold "
                                   f"{', '.join(str(n) for n in lengths[:, r])} ids (after max_len); the model "
                                   "reads them as parallel lists, so they must be equally long")
        for f in self.single:
            if (bad := np.nonzero(self._lengths(batch, f) != 1)[0]).size:
                r = int(bad[0])
                raise RequestError(f"row {r}: field '{column[f]}' holds {self._lengths(batch, f)[r]} ids; the model "
                                   "reads exactly one (its target)")

    def _convert(self, table: pa.Table, where: str, first_row: int) -> Batch:
        return to_batch(table, self.cfg.schema, np.arange(table.num_rows), where, with_labels=False,
                        first_row=first_row, side_bounds=self.side_bounds)


def _error(convert: Any, n: int) -> int:
    """The smallest row k such that converting rows [0, k] fails (convert(k + 1) fails, convert(k) does not)."""
    lo, hi = 0, n  # convert(lo) succeeds (0 rows), convert(hi) fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            convert(mid)
            lo = mid
        except DataError:
            hi = mid
    return lo
