"""User sequences -> leave-one-out splits -> per-rank batches of windows.

Protocol (SASRec/HSTU leave-one-out, with the validation item the reference code lacks, #61):
for a user with items i_1..i_n (oldest first), the test target is i_n, the validation target is
i_{n-1}, and training sees only i_1..i_{n-2}. Every split is then "a window ending at e":
tokens = the last (max_seq_len + 1) items of i_1..i_e, with e = n-2 (train), n-1 (valid), n (test).
The encoder reads tokens[:-1] and position t is scored against tokens[t+1], so training is
next-item prediction at every position and evaluation scores the window's last token from the
history before it. Users need n >= 4 to train (two tokens) and n >= 3 to be evaluated.

Sequence files hold one row per user, so they are read whole (ML-20M: 138k users, ~20M ids);
each split's users are cut into contiguous per-rank ranges of a seeded per-epoch permutation, so
every user is used exactly once per epoch across ranks, and ranks are padded to the same batch
count with zero-weight copies (lockstep for the sharded embedding's collectives).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from trec_rank.data.dataset import list_parquet_files
from trec_rank.retrieval.config import RetrievalConfig

SPLIT_END = {"train": 2, "valid": 1, "test": 0}  # items dropped from each user's end
MIN_ITEMS = {"train": 4, "valid": 3, "test": 3}


@dataclass
class Sequences:
    """All users' items and timestamps as one jagged array: user u owns [offsets[u], offsets[u+1])."""

    items: np.ndarray  # [total] int64
    timestamps: np.ndarray  # [total] int64
    offsets: np.ndarray  # [users + 1] int64
    actions: np.ndarray | None = None  # [total] int64 action on each item (e.g. its rating); None: not read

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def corpus(self) -> np.ndarray:
        """Sorted distinct item ids: the candidates of full-corpus ranking and uniform sampling."""
        return np.unique(self.items)


def _column(table: pa.Table, name: str, file: str) -> tuple[np.ndarray, np.ndarray]:
    if name not in table.column_names:
        raise ValueError(f"{file}: missing column '{name}' (columns: {', '.join(table.column_names)})")
    arr = table.column(name).combine_chunks()
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)) or not pa.types.is_integer(
            arr.type.value_type):
        raise ValueError(f"{file}: column '{name}' has type {arr.type}, expected list<int64>")
    flat = pc.list_flatten(arr)
    if arr.null_count or flat.null_count:
        raise ValueError(f"{file}: column '{name}' has nulls")
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    return flat.to_numpy(zero_copy_only=False).astype(np.int64), lengths.astype(np.int64)


def read_sequences(path: str | Path, items_column: str, time_column: str, num_embeddings: int,
                   action_column: str = "", num_actions: int = 0) -> Sequences:
    """Read every Parquet file under `path`; ids must lie in [1, num_embeddings) (0 is padding).

    With `action_column`, also each item's action (aligned list<int64>), which must lie in
    [1, num_actions) (0 is reserved for "unknown", the action of a target the model has not seen)."""
    items, times, lengths, actions = [], [], [], []
    for file in list_parquet_files(path):
        try:
            table = pq.read_table(file, columns=None)
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"{file}: not a readable Parquet file ({err})") from None
        ids, n = _column(table, items_column, file)
        ts, n_ts = _column(table, time_column, file)
        if not np.array_equal(n, n_ts):
            row = int(np.nonzero(n != n_ts)[0][0])
            raise ValueError(f"{file}: '{time_column}' does not align with '{items_column}' at row {row}")
        if ids.size and (ids.min() < 1 or ids.max() >= num_embeddings):
            bad = ids[(ids < 1) | (ids >= num_embeddings)][0]
            raise ValueError(f"{file}: column '{items_column}' has id {bad} outside [1, {num_embeddings}) "
                             f"(item.num_embeddings)")
        if action_column:
            acts, n_act = _column(table, action_column, file)
            if not np.array_equal(n, n_act):
                row = int(np.nonzero(n != n_act)[0][0])
                raise ValueError(f"{file}: '{action_column}' does not align with '{items_column}' at row {row}")
            if acts.size and (acts.min() < 1 or acts.max() >= num_actions):
                raise ValueError(f"{file}: column '{action_column}' has values in [{acts.min()}, {acts.max()}], "
                                 f"outside [1, {num_actions}) (data.num_actions)")
            actions.append(acts)
        items.append(ids)
        times.append(ts)
        lengths.append(n)
    all_lengths = np.concatenate(lengths)
    offsets = np.concatenate([[0], np.cumsum(all_lengths)])
    return Sequences(np.concatenate(items), np.concatenate(times), offsets,
                     np.concatenate(actions) if action_column else None)


@dataclass
class Window:
    """A batch of windows, jagged: row r is tokens[offsets[r]:offsets[r+1]] (oldest first)."""

    items: np.ndarray  # [T] int64
    timestamps: np.ndarray  # [T] int64
    lengths: np.ndarray  # [B] int64, each >= 2
    users: np.ndarray  # [B] int64 row index of the user in the sequence file(s)
    weight: float  # 1.0, or 0.0 for lockstep padding
    actions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # [T], or [0]: none


class SplitReader:
    """One split's users for one rank: windows, batched, exactly once per epoch across ranks."""

    def __init__(self, seqs: Sequences, split: str, cfg: RetrievalConfig, batch_size: int, rank: int,
                 world_size: int, shuffle: bool) -> None:
        assert split in SPLIT_END and 0 <= rank < world_size
        self.seqs, self.rank, self.world, self.shuffle = seqs, rank, world_size, shuffle
        self.batch_size, self.seed, self.window = batch_size, cfg.data.seed, cfg.data.max_seq_len + 1
        self.users = np.nonzero(seqs.lengths >= MIN_ITEMS[split])[0]
        self.ends = seqs.offsets[1:] - SPLIT_END[split]  # exclusive end of each user's window
        if len(self.users) < world_size:
            raise ValueError(f"{split}: {len(self.users)} users with >= {MIN_ITEMS[split]} items, "
                             f"fewer than the {world_size} ranks")

    def _rank_users(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.users) if self.shuffle else self.users
        n = len(order)
        return order[self.rank * n // self.world:(self.rank + 1) * n // self.world]

    def num_batches(self) -> int:
        """Batches every rank yields per epoch (the longest rank's count; shorter ranks pad)."""
        n, w = len(self.users), self.world
        return max(math.ceil(((r + 1) * n // w - r * n // w) / self.batch_size) for r in range(w))

    def _window(self, users: np.ndarray, weight: float) -> Window:
        ends = self.ends[users]
        starts = np.maximum(self.seqs.offsets[users], ends - self.window)
        lengths = ends - starts
        out_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        idx = np.repeat(starts - out_starts, lengths) + np.arange(lengths.sum())
        actions = self.seqs.actions[idx] if self.seqs.actions is not None else np.zeros(0, dtype=np.int64)
        return Window(self.seqs.items[idx], self.seqs.timestamps[idx], lengths, users, weight, actions)

    def batches(self, epoch: int = 0, start_batch: int = 0) -> Iterator[tuple[int, Window]]:
        """(batch index, window batch) for `epoch` from `start_batch` on, padded to num_batches()."""
        users = self._rank_users(epoch)
        for i in range(start_batch, self.num_batches()):
            chunk = users[i * self.batch_size:(i + 1) * self.batch_size]
            yield i, (self._window(chunk, 1.0) if len(chunk) else self._window(users[:1], 0.0))
