"""Output layout of `trec-rank score`: parts, the job record, atomic writes and the `_SUCCESS` manifest.

OUT_DIR/
  _job.json             what this directory is for: input files and row count, part size, checkpoint,
                        config fingerprint, passthrough columns, quantization. Written by the first run;
                        every rerun must match it, so parts scored by two different models never mix.
  part-000000.parquet   part k = input rows [k*P, min((k+1)*P, N)) of the global row order (file order,
  part-000001.parquet   then row: the data layer's `row_index`), P = `part_rows` from _job.json.
  ...
  _SUCCESS              JSON manifest, written last, only once every part is present and verified:
                        input/output row counts, parts, columns, checkpoint, fingerprint, last run's stats.

Output schema (every part; rows in row_index order; one row group per part):
  row_index      int64    dataset row index of the input row: the key to join scores back to the input
  <passthrough>  as input default: the data.group_by column, user_id and item_id when the input has them
  p_<key>        float32  sigmoid of the model's logit `key`, for every output key not starting with '_'
                          (one per task, plus extra heads such as ESMM's p_cvr)

Why parts follow the global row order rather than ranks: a part's rows do not depend on the world size,
so a rerun on any number of ranks skips exactly the finished parts and scores exactly the missing ones.
A part is written under a dot-prefixed temporary name, fsynced and renamed, so a part file is either
complete or absent; temporaries of killed runs are deleted by the next run. A part's rows and scores depend
only on the job record, so a stray process of a killed run that finishes a part late replaces it with
the same rows and scores; still, run one job at a time per OUT_DIR. The dot/underscore names are skipped by the
data layer, so OUT_DIR can be read back as a dataset.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

JOB_FILE = "_job.json"
SUCCESS_FILE = "_SUCCESS"
MAX_PART_ROWS = 65536
READ_WINDOW = 8192  # rows the data layer converts at a time (bounds memory, not the part size)
TARGET_PARTS = 64
_PART = re.compile(r"^part-(\d{6})\.parquet$")


def part_name(k: int) -> str:
    return f"part-{k:06d}.parquet"


def num_parts(rows: int, part_rows: int) -> int:
    return math.ceil(rows / part_rows)


def part_range(k: int, part_rows: int, rows: int) -> tuple[int, int]:
    """Global input rows [lo, hi) of part k."""
    return k * part_rows, min((k + 1) * part_rows, rows)


def default_part_rows(rows: int, batch_size: int) -> int:
    """About rows/64 (enough parts to spread over ranks, little lost on a kill), at most 64K rows (one healthy
    Parquet row group), in whole read windows of whole batches (at least one). Independent of the world size
    by design (see the module docstring)."""
    unit = batch_size * max(1, READ_WINDOW // batch_size)
    target = min(MAX_PART_ROWS, max(1, math.ceil(rows / TARGET_PARTS)))
    return max(unit, target // unit * unit)


def read_window(part_rows: int, batch_size: int) -> int:
    """Rows the data layer converts at once: whole batches, at most READ_WINDOW, and a divisor of the
    part size, so a part never starts inside a window (no rows converted twice)."""
    per_part = part_rows // batch_size
    fits = max(1, READ_WINDOW // batch_size)
    return batch_size * max(d for d in range(1, min(per_part, fits) + 1) if per_part % d == 0)


def check_paths(input_path: str, output: str) -> None:
    """Refuse an output directory that is the input or lies inside it: the parts and `_SUCCESS` would land
    in the input split, and the next read of that split would take the scores for input rows."""
    inp, out = Path(os.path.realpath(input_path)), Path(os.path.realpath(output))
    if out == inp or inp in out.parents:
        raise ValueError(f"--output {output}: is {'' if out == inp else 'inside '}--input {input_path}; "
                         "choose an output directory outside the input")


def _fsync_write(path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_job(out: Path) -> dict[str, Any] | None:
    path = out / JOB_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


def prepare(out: Path, job: dict[str, Any]) -> tuple[list[int], bool]:
    """Rank 0, before any rank writes: check or record the job, drop dead temporaries, list finished parts.

    Returns (indices of complete parts, whether `_SUCCESS` already exists). A part whose footer is
    unreadable or whose row count is wrong is deleted and counted as missing, so it is scored again.
    """
    out.mkdir(parents=True, exist_ok=True)
    old = read_job(out)
    if old is None:
        if any(_PART.match(p.name) for p in out.iterdir()):
            raise ValueError(f"--output {out}: holds part files but no {JOB_FILE}; not a trec-rank score output "
                             "(delete it or choose another --output)")
        _fsync_write(out / JOB_FILE, json.dumps(job, indent=1, sort_keys=True).encode())
    else:
        diff = [k for k in sorted(set(old) | set(job)) if old.get(k) != job.get(k)]
        if diff:
            detail = "; ".join(f"{k}: was {_short(old.get(k))}, now {_short(job.get(k))}" for k in diff)
            raise ValueError(f"--output {out}: was started by another scoring job ({detail}); delete it or "
                             "choose another --output")
    for tmp in out.glob(".part-*.tmp-*"):
        tmp.unlink(missing_ok=True)
    rows, part_rows = job["input"]["rows"], job["part_rows"]
    done = []
    for p in sorted(out.iterdir()):
        m = _PART.match(p.name)
        if not m:
            continue
        k = int(m.group(1))
        lo, hi = part_range(k, part_rows, rows)
        try:
            ok = k < num_parts(rows, part_rows) and pq.ParquetFile(p).metadata.num_rows == hi - lo
        except (pa.ArrowException, OSError):
            ok = False
        if ok:
            done.append(k)
        else:
            p.unlink()
    return done, (out / SUCCESS_FILE).is_file()


def write_part(out: Path, k: int, table: pa.Table) -> None:
    """Write part k atomically: temporary dot-file, fsync, rename."""
    final = out / part_name(k)
    tmp = out / f".{final.name}.tmp-{os.getpid()}"
    pq.write_table(table, tmp, row_group_size=max(table.num_rows, 1))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def finalize(out: Path, job: dict[str, Any], run_stats: dict[str, Any]) -> dict[str, Any]:
    """Rank 0, after every rank finished: verify all parts, then write `_SUCCESS` (atomically, last)."""
    rows, part_rows = job["input"]["rows"], job["part_rows"]
    schema, total = None, 0
    for k in range(num_parts(rows, part_rows)):
        path = out / part_name(k)
        if not path.is_file():
            raise RuntimeError(f"{path}: missing after all ranks finished (removed by someone else?); rerun")
        meta = pq.ParquetFile(path)
        lo, hi = part_range(k, part_rows, rows)
        if meta.metadata.num_rows != hi - lo:
            raise RuntimeError(f"{path}: {meta.metadata.num_rows} rows, expected {hi - lo}; delete it and rerun")
        if schema is None:
            schema = meta.schema_arrow
        elif not meta.schema_arrow.equals(schema):
            raise RuntimeError(f"{path}: columns differ from {part_name(0)}; delete the output and rerun")
        total += hi - lo
    fd = os.open(out, os.O_RDONLY)  # make the part renames durable before _SUCCESS claims them
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    manifest = {
        "format": 1, "input": job["input"], "input_rows": rows, "output_rows": total,
        "parts": num_parts(rows, part_rows), "part_rows": part_rows,
        "columns": [{"name": f.name, "type": str(f.type)} for f in (schema or [])],
        "checkpoint": job["checkpoint"], "fingerprint": job["fingerprint"], "quantize": job["quantize"],
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "last_run": run_stats,
    }
    _fsync_write(out / SUCCESS_FILE, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest
