"""A directory of Parquet files read as batches, split exactly once across ranks and workers.

Work is cut by row group. Each epoch orders the row groups (seeded shuffle when asked), lays
their rows end to end and gives rank r the contiguous range [r*N/W, (r+1)*N/W): every row is
read once per epoch across all ranks, and ranks differ by at most one row, so they run the same
number of steps (a requirement of the collectives inside a sharded model). A rank's range is cut
into windows of S rows (S a multiple of the batch size): window i goes to loader worker i % K,
rows are shuffled inside a window, and windows come back in order, so the batch stream is the
same for any number of workers and a resume point is just a batch count.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trec_rank.config.schema import Schema
from trec_rank.data.batch import Batch
from trec_rank.data.convert import DataError, SideBounds, check_arrow_types, expected_columns, to_batch, to_batches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowGroup:
    file: str
    index: int
    rows: int
    base: int  # stable dataset row index of its first row (file order, then row)
    start: int = 0  # index of its first row within its file (for messages that name a row)


def pin_for(device: torch.device) -> bool:
    """Whether batches bound for `device` should sit in page-locked host memory: only for CUDA, where
    it lets `to(device, non_blocking=True)` copy asynchronously instead of staging through a sync copy.
    On CPU there is no copy to overlap, and pinning needs an accelerator."""
    return device.type == "cuda"


def _hidden(name: str) -> bool:
    return name.startswith(("_", "."))


def list_parquet_files(path: str | Path) -> list[str]:
    """The `.parquet` files directly inside `path` (or `path` itself), sorted; names starting with '_' or '.'
    (manifests, temporaries) skipped.

    A subfolder holding Parquet files is refused rather than read or ignored: reading it silently doubled
    a split that kept a backup copy inside it (train/backup/part.parquet), and ignoring it would silently
    drop data laid out in partition folders. Subfolders named '_*' or '.*' are never looked at."""
    p = Path(path)
    if p.is_file():
        return [str(p)]
    if not p.is_dir():
        raise DataError(f"data path not found: {p}")
    nested = sorted(d.name for d in p.iterdir() if d.is_dir() and not _hidden(d.name)
                    and any(not any(_hidden(part) for part in f.relative_to(d).parts) for f in d.rglob("*.parquet")))
    if nested:
        shown = ", ".join(f"{n}/" for n in nested[:5]) + (f" and {len(nested) - 5} more" if len(nested) > 5 else "")
        raise DataError(f"{p}: subfolder(s) {shown} hold Parquet files; a split reads only the .parquet files "
                        f"directly inside it (move them out, rename the subfolder to start with '_', or point at "
                        f"the subfolder itself)")
    files = sorted(str(f) for f in p.glob("*.parquet") if not _hidden(f.name) and f.is_file())
    if not files:
        raise DataError(f"{p}: no .parquet files found")
    return files


class ParquetDataset:
    """Opening validates every file (types always; values too when `validate='full'`).

    `side_bounds` (from `config.models.side_bounds`) are the side columns the model reads as embedding
    indices: each chunk is checked against them as it is converted, once, instead of every step in
    the model. `pin_memory` (see `pin_for`) puts batches in page-locked memory: in the DataLoader's
    pinning thread with workers, as each window is built without them."""

    def __init__(self, path: str | Path, schema: Schema, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 shuffle: bool = False, seed: int = 0, drop_last: bool = False, shuffle_buffer: int = 8192,
                 num_workers: int = 0, with_labels: bool = True, validate: str = "full",
                 side_bounds: SideBounds | None = None, pin_memory: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        assert 0 <= rank < world_size
        self.schema, self.batch_size, self.rank, self.world_size = schema, batch_size, rank, world_size
        self.shuffle, self.seed, self.drop_last, self.num_workers = shuffle, seed, drop_last, num_workers
        self.with_labels, self.side_bounds, self.pin_memory = with_labels, dict(side_bounds or {}), pin_memory
        self.columns = expected_columns(schema, with_labels)
        self.window = max(1, math.ceil(shuffle_buffer / batch_size)) * batch_size
        self.files = list_parquet_files(path)
        self.scanned = validate == "full"
        self.row_groups = self._open(self.scanned)
        self.num_rows = sum(g.rows for g in self.row_groups)
        if self.num_rows == 0:
            raise DataError(f"{path}: dataset is empty (all {len(self.files)} file(s) have no rows)")

    def _open(self, scan_values: bool) -> list[RowGroup]:
        groups, base = [], 0
        for file in self.files:
            try:
                meta = pq.ParquetFile(file).metadata
                arrow_schema = pq.read_schema(file)
            except (pa.ArrowException, OSError) as err:
                raise DataError(f"{file}: not a readable Parquet file ({err})") from None
            check_arrow_types(self.schema, arrow_schema, file, self.with_labels)
            if meta.num_rows == 0:
                log.warning("%s: empty Parquet file, skipped", file)
                continue
            start = 0
            for i in range(meta.num_row_groups):
                rows = meta.row_group(i).num_rows
                if rows:
                    groups.append(RowGroup(file, i, rows, base, start))
                    base += rows
                    start += rows
        if scan_values:
            for g in groups:
                self._check(g, self._read(g))
        return groups

    # ---- reading ---------------------------------------------------------------------------
    def _read(self, g: RowGroup) -> pa.Table:
        try:
            return pq.ParquetFile(g.file).read_row_group(g.index, columns=self.columns)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{g.file} (row group {g.index}): cannot be read ({err})") from None

    def _convert(self, table: pa.Table, row_index: np.ndarray, where: str, first_row: int = 0) -> Batch:
        return to_batch(table, self.schema, row_index, where, self.with_labels, first_row, self.side_bounds)

    def _check(self, g: RowGroup, table: pa.Table) -> None:
        """Convert a whole row group once for its checks; messages name the file and the row in it."""
        self._convert(table, np.arange(g.rows) + g.base, g.file, g.start)

    # ---- partition -------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[RowGroup]:
        if not self.shuffle:
            return self.row_groups
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.row_groups))
        return [self.row_groups[i] for i in perm]

    def rank_rows(self, rank: int) -> int:
        n, w = self.num_rows, self.world_size
        return (rank + 1) * n // w - rank * n // w

    def num_batches(self, rank: int | None = None) -> int:
        rows = self.rank_rows(self.rank if rank is None else rank)
        return rows // self.batch_size if self.drop_last else math.ceil(rows / self.batch_size)

    def max_batches(self) -> int:
        """Steps every rank runs when padded to lockstep (the longest rank's batch count)."""
        return max(self.num_batches(r) for r in range(self.world_size))

    def _pieces(self, epoch: int) -> list[tuple[RowGroup, int, int]]:
        """This rank's (row group, lo, hi) slices for `epoch`, in stream order."""
        lo_rank = self.rank * self.num_rows // self.world_size
        hi_rank = lo_rank + self.rank_rows(self.rank)
        pieces, pos = [], 0
        for g in self._order(epoch):
            lo, hi = max(lo_rank - pos, 0), min(hi_rank - pos, g.rows)
            if lo < hi:
                pieces.append((g, lo, hi))
            pos += g.rows
            if pos >= hi_rank:
                break
        return pieces

    def _window(self, pieces: list[tuple[RowGroup, int, int]], starts: list[int], epoch: int,
                index: int, cache: dict) -> list[Batch]:
        total = starts[-1]
        w_lo, w_hi = index * self.window, min((index + 1) * self.window, total)
        tables, rows = [], []
        k = bisect.bisect_right(starts, w_lo) - 1
        while k < len(pieces) and starts[k] < w_hi:
            g, lo, hi = pieces[k]
            a = lo + max(w_lo - starts[k], 0)
            b = lo + min(w_hi - starts[k], hi - lo)
            if cache.get("key") != (g.file, g.index):
                cache.update(key=(g.file, g.index), table=self._read(g))
                if not self.scanned:  # values not checked on open: check this row group, naming it
                    self._check(g, cache["table"])
            tables.append(cache["table"].slice(a, b - a))
            rows.append(np.arange(a, b) + g.base)
            k += 1
        table, row_index = pa.concat_tables(tables), np.concatenate(rows)
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch, self.rank, index]).permutation(len(row_index))
            table, row_index = table.take(perm), row_index[perm]
        where = f"rank {self.rank} epoch {epoch} window {index}"
        return to_batches(table, self.schema, row_index, where, self.batch_size, self.drop_last, self.with_labels,
                          self.side_bounds)

    def batches(self, epoch: int = 0, start_batch: int = 0) -> Generator[Batch, None, None]:
        """This rank's batches for `epoch`, skipping the first `start_batch` (resume) without reading them."""
        pieces = self._pieces(epoch)
        starts = [0]
        for _, lo, hi in pieces:
            starts.append(starts[-1] + hi - lo)
        skip_rows = start_batch * self.batch_size
        first = skip_rows // self.window
        n_windows = math.ceil(starts[-1] / self.window)
        windows = list(range(first, n_windows))
        drop = (skip_rows - first * self.window) // self.batch_size
        windowed = _Windows(self, pieces, starts, epoch, windows)
        stream: Iterable[list[Batch]] = windowed
        if self.num_workers > 0 and len(windows) > 1:
            stream = DataLoader(windowed, batch_size=None, num_workers=min(self.num_workers, len(windows)),
                                collate_fn=_identity, multiprocessing_context="fork", pin_memory=self.pin_memory)
        elif self.pin_memory:
            stream = ([b.pin_memory() for b in window] for window in windowed)
        for i, window in enumerate(stream):
            yield from (window[drop:] if i == 0 else window)

    def lockstep(self, epoch: int = 0, start_batch: int = 0) -> Iterator[Batch]:
        """Batches padded to `max_batches()` with zero-weight copies, so all ranks step together."""
        n, last = start_batch, None
        for last in self.batches(epoch, start_batch):
            n += 1
            yield last
        if n < self.max_batches():
            if last is None:
                g = self.row_groups[0]
                last = self._convert(self._read(g).slice(0, 1), np.array([g.base]), g.file)
            pad = last.with_zero_weights()
            for _ in range(self.max_batches() - n):
                yield pad


def _identity(x):  # noqa: ANN001, ANN202 - DataLoader collate for pre-built window lists
    return x


class _Windows(IterableDataset):
    """Windows of one rank's stream; worker w of K builds windows w, w+K, ... (DataLoader keeps order)."""

    def __init__(self, ds: ParquetDataset, pieces, starts, epoch: int, windows: list[int]) -> None:  # noqa: ANN001
        self.ds, self.pieces, self.starts, self.epoch, self.windows = ds, pieces, starts, epoch, windows

    def __iter__(self) -> Iterator[list[Batch]]:
        info = get_worker_info()
        wid, k = (info.id, info.num_workers) if info else (0, 1)
        cache: dict = {}
        torch.set_num_threads(1) if info else None
        for i in range(wid, len(self.windows), k):
            yield self.ds._window(self.pieces, self.starts, self.epoch, self.windows[i], cache)
