"""One rank's scoring loop: its parts in order, each part's batches through the model, one Parquet file each.

Consecutive parts of a rank are read as one stream (`ParquetDataset.batches(start_batch=...)` on a
one-rank view of the input, so batches follow the global row order and a part starts on a batch
boundary: part size is a multiple of the batch size). Parts skipped because an earlier run finished
them split the stream into runs. A sharded model exchanges embeddings on every forward, so with
`lockstep` each rank pads its forwards to the longest rank's count with a batch whose scores are dropped.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from trec_rank.data.batch import Batch
from trec_rank.data.dataset import ParquetDataset, RowGroup
from trec_rank.score.model import ScoringModel
from trec_rank.score.output import part_range, write_part

# int8 vs fp32 AUC keeps (label, p_int8, p_fp32) per row: 12 bytes x 4M = 48 MB per rank at most, so
# memory stays flat on any input; the change is measured on each rank's first MEASURE_ROWS rows.
MEASURE_ROWS = 4_000_000


def rss_mb() -> float:
    """Resident set size of this process now (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class PassthroughReader:
    """Input columns copied to the output (join keys, anything named), read by global row range.

    Reads only those columns of the row groups a range touches and keeps the last row group, since
    consecutive parts usually cut one row group several times."""

    def __init__(self, row_groups: list[RowGroup], columns: list[str]) -> None:
        self.groups, self.columns = row_groups, columns
        self.bases = [g.base for g in row_groups]
        self.cache: tuple[RowGroup, pa.Table] | None = None

    def _table(self, g: RowGroup) -> pa.Table:
        if self.cache is None or self.cache[0] != g:
            self.cache = (g, pq.ParquetFile(g.file).read_row_group(g.index, columns=self.columns))
        return self.cache[1]

    def read(self, lo: int, hi: int) -> dict[str, pa.ChunkedArray]:
        if not self.columns:
            return {}
        pieces = []
        k = bisect.bisect_right(self.bases, lo) - 1
        while k < len(self.groups) and self.groups[k].base < hi:
            g = self.groups[k]
            a, b = max(lo - g.base, 0), min(hi - g.base, g.rows)
            pieces.append(self._table(g).slice(a, b - a))
            k += 1
        table = pa.concat_tables(pieces)
        return {c: table.column(c) for c in self.columns}


def probabilities(logits: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """sigmoid of every output key not starting with '_' (auxiliary losses): key -> [B] float32."""
    return {k: torch.sigmoid(v.detach().float()).cpu().numpy() for k, v in logits.items() if not k.startswith("_")}


@dataclass
class RankStats:
    rows: int = 0
    batches: int = 0  # forwards run, lockstep padding included
    measured: int = 0  # rows also scored by the fp32 reference
    rss_mb: dict[str, float] = field(default_factory=dict)  # start / middle / end of the loop
    labels: dict[str, list[np.ndarray]] = field(default_factory=dict)  # task -> labels of scored rows
    scores: dict[str, list[np.ndarray]] = field(default_factory=dict)  # task -> p of the scoring model
    reference: dict[str, list[np.ndarray]] = field(default_factory=dict)  # task -> p of the fp32 reference


def _runs(parts: list[int]) -> list[list[int]]:
    """[3, 4, 5, 9, 10] -> [[3, 4, 5], [9, 10]]: each run is read as one stream."""
    runs: list[list[int]] = []
    for k in parts:
        if runs and runs[-1][-1] == k - 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    return runs


def batches_for(parts: list[int], part_rows: int, rows: int, batch_size: int) -> int:
    return sum(math.ceil((hi - lo) / batch_size) for lo, hi in (part_range(k, part_rows, rows) for k in parts))


class RankScorer:
    """Scores one rank's parts with one model; `run` returns the counts and samples job.py aggregates."""

    def __init__(self, ds: ParquetDataset, model: ScoringModel, part_rows: int, out: Path,
                 passthrough: PassthroughReader, device: torch.device, progress: bool) -> None:
        assert part_rows % ds.batch_size == 0 and ds.world_size == 1 and not ds.shuffle
        self.ds, self.model, self.part_rows, self.out = ds, model, part_rows, out
        self.passthrough, self.device, self.progress = passthrough, device, progress
        self.measure = model.reference is not None and bool(ds.with_labels)
        self.stats = RankStats()

    @torch.no_grad()
    def _score(self, batch: Batch) -> dict[str, np.ndarray]:
        """Probabilities of one batch; with an fp32 reference, also keeps (label, int8, fp32) for dAUC."""
        batch = batch.to(self.device, non_blocking=True)
        probs = probabilities(self.model.forward(batch))
        if self.measure and self.stats.measured < MEASURE_ROWS:
            self.stats.measured += batch.batch_size
            assert self.model.reference is not None, "measuring int8 needs the fp32 reference"
            ref = probabilities(self.model.reference(batch))
            for task in ref.keys() & batch.labels.keys():
                self.stats.labels.setdefault(task, []).append(batch.labels[task].cpu().numpy())
                self.stats.scores.setdefault(task, []).append(probs[task])
                self.stats.reference.setdefault(task, []).append(ref[task])
        self.stats.batches += 1
        return probs

    def _part(self, k: int, stream: Iterator[Batch], bar: tqdm) -> None:
        lo, hi = part_range(k, self.part_rows, self.ds.num_rows)
        probs: dict[str, list[np.ndarray]] = {}
        index = []
        for _ in range(math.ceil((hi - lo) / self.ds.batch_size)):
            batch = next(stream)
            for key, p in self._score(batch).items():
                probs.setdefault(key, []).append(p)
            index.append(batch.row_index.numpy())
            bar.update(batch.batch_size)
        row_index = np.concatenate(index)
        assert np.array_equal(row_index, np.arange(lo, hi)), f"part {k}: rows out of order"
        columns = {"row_index": pa.array(row_index, pa.int64()), **self.passthrough.read(lo, hi)}
        columns.update({f"p_{key}": pa.array(np.concatenate(v), pa.float32()) for key, v in probs.items()})
        write_part(self.out, k, pa.table(columns))
        self.stats.rows += hi - lo

    def run(self, parts: list[int], pad_to: int) -> RankStats:
        """Score `parts` (sorted); with lockstep, run dummy forwards until `pad_to` batches in total."""
        b = self.ds.batch_size
        total = sum(hi - lo for lo, hi in (part_range(k, self.part_rows, self.ds.num_rows) for k in parts))
        bar = tqdm(total=total, unit="row", unit_scale=True, disable=not self.progress, dynamic_ncols=True,
                   desc="score (rank 0)", mininterval=1.0)
        self.stats.rss_mb["start"] = rss_mb()
        for run in _runs(parts):
            stream = self.ds.batches(0, start_batch=run[0] * self.part_rows // b)
            for k in run:
                self._part(k, stream, bar)
                if "middle" not in self.stats.rss_mb and self.stats.rows * 2 >= total:
                    self.stats.rss_mb["middle"] = rss_mb()
            stream.close()
        bar.close()
        if self.model.lockstep and self.stats.batches < pad_to:
            pad = next(self.ds.batches(0, 0)).with_zero_weights()
            while self.stats.batches < pad_to:  # scores dropped: only the collectives matter
                self._score(pad)
        self.stats.rss_mb.setdefault("middle", rss_mb())
        self.stats.rss_mb["end"] = rss_mb()
        return self.stats
