"""`trec-rank data describe PATH`: a starter experiment config read off the Parquet files themselves.

The YAML it prints trains as it is (`trec-rank train`), but it is a guess from column types and value
statistics, meant to be read and edited: every choice carries a comment with the numbers behind it.
Rules, by Arrow type:
  int / string          sparse feature with its own table. Ids that fit `[0, 10 * distinct)` index the
                        table directly (num_embeddings = max + 1); other ints (large or negative) and
                        strings are hashed (`oov: hash`) into about 10 * distinct rows.
  list<int | string>    sequence feature; max_len = the 95th percentile of the list lengths. A list whose
                        name ends with `_<scalar column>` (hist_item_id and item_id) shares that table.
  float                 dense feature.
  0/1 only (int, float, bool)   label (a binary task).
Skipped, with a comment: numeric columns named as times (ts, time, timestamp, date, ...), id columns
unique on almost every row or list element (row ids, timestamps), list<float> (candidates for a
sequence's `side` columns), and every other type.

Why 10x for hashed tables: k distinct ids hashed uniformly into n rows leave an id sharing its row with
at least one other id with probability 1 - (1 - 1/n)^(k-1) ~ 1 - exp(-k/n): 9.5% at n = 10k, 39% at
n = 2k, 63% at n = k. The comment on each hashed table prints its own estimate.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from trec_rank.data.convert import DataError

HASH_FACTOR = 10  # hashed table rows per distinct id (see the module docstring)
MAX_ROWS = 1_000_000  # rows read for the statistics; enough to size tables, cheap on a laptop
EMBEDDING_DIM = 16  # one dim for every table: tables read by sequences must share it
BATCH_SIZE = 256  # data.batch_size's default, for the steps per epoch
SPLIT_ORDER = ("train", "valid", "validation", "val", "eval", "test")


@dataclass
class Column:
    """One column's role in the starter config, and the comment explaining it."""

    name: str
    kind: str  # sparse | sequence | dense | label | skip
    note: str
    table: str = ""
    rows: int = 0  # suggested num_embeddings
    hashed: bool = False
    max_len: int = 0
    distinct: set = field(default_factory=set, repr=False)


def _hidden(part: str) -> bool:
    return part.startswith(("_", "."))


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"data describe: path not found: {path}")
    # the folder's own files and those of its split folders, as training reads them (no deeper)
    files = sorted(f for pattern in ("*.parquet", "*/*.parquet") for f in path.glob(pattern)
                   if f.is_file() and not any(_hidden(p) for p in f.relative_to(path).parts))
    if not files:
        raise DataError(f"data describe: {path}: no .parquet files in it or in its subfolders "
                        f"(expected PATH/*.parquet or PATH/<split>/*.parquet)")
    if len({f.parent for f in files}) > 1 and any(f.parent == path for f in files):
        raise DataError(f"data describe: {path}: holds Parquet files both directly and in subfolders; a split "
                        f"is one folder of files: give the folder of split folders, or one split")
    return files


def _splits(path: Path, files: list[Path]) -> list[str]:
    """Subfolders holding Parquet files directly (the splits), train first, then valid, test, the rest."""
    if path.is_file():
        return []
    names = {f.parent.name for f in files if f.parent.parent == path}
    rank = {n: i for i, n in enumerate(SPLIT_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def _read(files: list[Path]) -> tuple[pa.Table, int]:
    """The first MAX_ROWS rows over `files` (in order) and the total row count from the footers."""
    parts, taken, total = [], 0, 0
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{f}: not a readable Parquet file ({err})") from None
        total += pf.metadata.num_rows
        for batch in pf.iter_batches(batch_size=65536):
            if taken >= MAX_ROWS:
                break
            parts.append(pa.Table.from_batches([batch.slice(0, MAX_ROWS - taken)]))
            taken += parts[-1].num_rows
    try:
        return pa.concat_tables(parts, promote_options="none").combine_chunks(), total
    except pa.ArrowInvalid as err:
        raise DataError(f"data describe: the files do not share one schema ({err})") from None


def _ident(name: str) -> str:
    """A feature/table name the schema accepts (letters, digits, '_')."""
    out = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return out if re.match(r"^[A-Za-z_]", out) else f"c_{out}"


def _nice(n: float) -> int:
    """Round up to two significant digits (12,340 -> 13,000): sizes a reader can take in at a glance."""
    if n < 100:
        return max(1, math.ceil(n))
    step = 10 ** (int(math.log10(n)) - 1)
    return math.ceil(n / step) * step


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _is_id(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _binary(arr: pa.Array) -> bool:
    if arr.null_count or len(arr) == 0:
        return False
    values = pc.unique(arr)
    return len(values) <= 2 and set(values.to_pylist()) <= {0, 1}


def _ids(name: str, values: pa.Array, kind: str, note: str) -> Column:
    """Size a table for the non-null ids in `values` (flattened list values for sequences)."""
    values = values.drop_null()
    distinct = pc.unique(values)
    k = len(distinct)
    col = Column(name, kind, note, distinct=set(distinct.to_pylist()))
    if pa.types.is_integer(values.type) and k and pc.min(values).as_py() >= 0 and \
            pc.max(values).as_py() + 1 <= HASH_FACTOR * k:
        col.rows = pc.max(values).as_py() + 1
        col.note += f"{k:,} distinct ids in [0, {col.rows:,}): the table is indexed by the id itself"
        return col
    col.rows, col.hashed = _nice(HASH_FACTOR * max(k, 1)), True
    why = "string ids" if not pa.types.is_integer(values.type) else "ids beyond 10x their count (or negative)"
    share = 1 - math.exp(-max(k - 1, 0) / col.rows)
    col.note += (f"{k:,} distinct {why}, hashed into {col.rows:,} rows: ~{share:.1%} of the ids share a row "
                 f"with another id")
    return col


_TIME = re.compile(r"(^|_)(ts|time|timestamps?|date|datetime|epoch)($|_)", re.IGNORECASE)


def _column(name: str, arr: pa.Array, rows: int) -> Column:
    t = arr.type
    if _TIME.search(name) and (pa.types.is_integer(t) or pa.types.is_floating(t) or _is_list(t)):
        return Column(name, "skip", "a time by its name: bucket it into ids, or use it as a sequence's `side` "
                                    "(timestamp) for HSTU")
    if pa.types.is_boolean(t) or ((pa.types.is_integer(t) or pa.types.is_floating(t)) and _binary(arr)):
        rate = pc.mean(pc.cast(arr, pa.float64())).as_py()
        return Column(name, "label", f"only 0/1 values (rate {rate:.3f}): a binary task; if it is an input, "
                                     f"make it a sparse feature instead")
    if pa.types.is_floating(t):
        x = pc.cast(arr.drop_null(), pa.float64()).to_numpy(zero_copy_only=False)
        note = f"mean {x.mean():.3g}, std {x.std():.3g}" if len(x) else "all null"
        if len(x) and (abs(x.mean()) > 10 or x.std() > 10):
            note += ": standardize it upstream (raw large values slow the MLP's training)"
        return Column(name, "dense", note + (f"; {arr.null_count:,} nulls must be filled" if arr.null_count else ""))
    if _is_id(t):
        k = len(pc.unique(arr))
        if rows >= 1000 and k > rows // 2:
            return Column(name, "skip", f"{k:,} distinct values in {rows:,} rows: a row id or a timestamp, "
                                        f"not a feature")
        nulls = f"{arr.null_count:,} null ids must be filled upstream; " if arr.null_count else ""
        return _ids(name, arr, "sparse", nulls)
    if _is_list(t) and _is_id(t.value_type):
        flat = pc.list_flatten(arr)
        k = len(pc.unique(flat))
        if len(flat) >= 1000 and k > len(flat) // 2:
            return Column(name, "skip", f"{k:,} distinct values in {len(flat):,} list elements: timestamps or "
                                        f"row ids; if aligned with a sequence, add it as that sequence's `side`")
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
        p95 = max(1, int(np.ceil(np.percentile(lengths, 95)))) if len(lengths) else 1
        col = _ids(name, flat, "sequence",
                   f"lengths mean {lengths.mean():.1f}, p95 {p95}, max {lengths.max(initial=0)}; ")
        col.max_len = p95
        return col
    if _is_list(t):
        return Column(name, "skip", f"{t}: not ids; if aligned with a sequence, add it as that sequence's `side`")
    return Column(name, "skip", f"type {t} is not read by the schema")


def _share_tables(cols: list[Column]) -> None:
    """A list column named `<prefix>_<scalar>` reads the scalar's table (hist_item_id -> item_id's)."""
    scalars = {c.name: c for c in cols if c.kind == "sparse"}
    short = [_ident(re.sub(r"_ids?$", "", c.name) or c.name) for c in cols]
    for c, name in zip(cols, short):  # 'user_id' reads table 'user', unless two columns would share a name
        c.table = name if short.count(name) == 1 else _ident(c.name)
    for c in (c for c in cols if c.kind == "sequence"):
        owner = next((s for n, s in scalars.items() if c.name.endswith("_" + n) and s.hashed == c.hashed), None)
        if owner is None:
            continue
        c.table = owner.table
        both = owner.distinct | c.distinct
        if owner.hashed:
            owner.rows = max(owner.rows, _nice(HASH_FACTOR * len(both)))
        else:
            owner.rows = max(owner.rows, c.rows)
        c.note += f"; shares table '{owner.table}' with {owner.name}"


def _q(value: object) -> str:
    """A YAML scalar that reads back as this exact string (JSON strings are YAML)."""
    text = str(value)
    return text if re.fullmatch(r"[A-Za-z0-9_./-]+", text) else json.dumps(text)


def _flow(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"


def describe(path: str | Path) -> str:
    """The starter config for the Parquet file or folder at `path`, as YAML text with comments."""
    path = Path(path)
    files = _files(path)
    splits = _splits(path, files)
    table, total = _read(files)
    cols = [_column(name, table.column(name), table.num_rows) for name in table.column_names]
    _share_tables(cols)
    used = [c for c in cols if c.kind != "skip"]
    labels = [c for c in cols if c.kind == "label"]
    sparse = [c for c in cols if c.kind == "sparse"]
    group = next((_ident(c.name) for c in sparse if "user" in c.name.lower()), "")
    out = [f"# Starter config from `trec-rank data describe {path}`: {total:,} rows in {len(files)} file(s), "
           f"statistics over the first {table.num_rows:,}.",
           "# Read every comment and edit: labels are the 0/1 columns; drop any input known only after the label",
           "# (a rating when the label is like = rating >= 4): it leaks the answer. Then:",
           "#   trec-rank train THIS.yaml --run-dir runs/NAME", "data:"]
    if splits:
        evals = splits[1:] or splits[:1]
        out += [f"  path: {_q(path)}", f"  train_split: {_q(splits[0])}",
                f"  eval_splits: [{', '.join(_q(e) for e in evals)}]"]
        if len(splits) == 1:
            out[-1] += "   # no second split found: evaluating on the training rows"
    else:
        out += [f"  path: {_q(path.parent)}", f"  train_split: {_q(path.name)}",
                f"  eval_splits: [{_q(path.name)}]   # one split only: evaluating on the training rows; put "
                f"train/valid/test folders under one root for a real evaluation"]
    out.append(f"  group_by: {group}   # GAUC averages AUC per {group}" if group else
               "  # group_by: user_id   # a sparse feature to average AUC over (GAUC)")
    out += ["schema:", "  tables:"]
    for c in sparse + [c for c in cols if c.kind == "sequence" and c.table not in {s.table for s in sparse}]:
        out.append(f"    - {_flow({'name': c.table, 'num_embeddings': c.rows, 'embedding_dim': EMBEDDING_DIM})}")
    out.append("  features:")
    for c in used:
        entry: dict[str, str | int] = {"name": _ident(c.name), "kind": c.kind}
        if c.name != _ident(c.name):
            entry["column"] = _q(c.name)
        if c.kind in ("sparse", "sequence"):
            entry["table"] = c.table
        if c.kind == "sequence":
            entry["max_len"] = c.max_len
        if c.hashed:
            entry["oov"] = "hash"
        out.append(f"    - {_flow(entry)}   # {c.note}")
    for c in (c for c in cols if c.kind == "skip"):
        out.append(f"    # skipped {c.name}: {c.note}")
    if not labels:
        out.append("    # NO 0/1 column found: add one (kind: label) before training")
    out += ["model:", "  name: base   # pooled features + MLP; see README 'Models' for din, mmoe, esmm, hstu",
            "  params: {hidden: [256, 128]}", "train:", "  epochs: 1"]
    train_files = [f for f in files if not splits or f.parent.name == splits[0]]
    steps = sum(pq.ParquetFile(f).metadata.num_rows for f in train_files) // BATCH_SIZE  # drop_last: whole batches
    out += [f"  eval_every: {max(1, steps // 4)}   # steps; {steps:,} steps per epoch of {BATCH_SIZE} rows "
            f"(data.batch_size): about 4 evaluations per epoch for `trec-rank report`",
            f"  log_every: {max(1, min(50, steps // 50))}   # steps between train/loss points", ""]
    return "\n".join(out)


def write_or_print(path: str, out: str | None) -> None:
    """Print the config, or write it to `out` (never over an existing file)."""
    text = describe(path)
    if out is None:
        print(text, end="")
        return
    target = Path(out)
    if target.exists():
        raise ValueError(f"data describe --out {out}: exists; choose a new file name")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    print(f"wrote {out}: edit it, then trec-rank train {out} --run-dir runs/{target.stem}")
