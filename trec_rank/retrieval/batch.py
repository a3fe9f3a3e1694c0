"""Window batches -> `RetrievalBatch`: the item KJT the sharded EmbeddingCollection reads, plus negatives.

Negatives are sampled here, in the data path, not in the model: TrainPipelineSparseDist only
pipelines sharded-module inputs that are plain attributes of the batch, and the negatives'
embeddings must come from the same sharded table as the positives. So every step looks up one
KJT with two features on the item table:
  seq: each row's tokens (jagged, oldest first; positions predict the next token),
  neg: the step's distinct candidate ids, all on row 0 (a KJT needs lengths per row, any split works).
`neg_index[p, r]` points position p's r-th negative into those candidates; sampling ids per
position and looking up only the distinct ones keeps the lookup and its all-to-all at
<= min(#corpus, P*R) rows while the loss still sees R independent negatives per position.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from trec_rank.retrieval.data import Window

FEATURES = ["seq", "neg"]


@dataclass
class RetrievalBatch(Pipelineable):
    """B user windows; P = sum(lengths - 1) positions with a next-item target.

    ids:        KJT keys ["seq", "neg"], stride B (jagged).
    timestamps: [T] int64, aligned with the `seq` values.
    neg_index:  [P, R] int64 into the `neg` values ([P, 0] when no loss is computed).
    hit:        [P, R] bool, negative == the position's positive (accidental hit, masked in the loss).
    weights:    [B] float32 (0: lockstep padding row).
    users:      [B] int64 user row in the sequence files.
    actions:    [T] int64 action on each `seq` value (e.g. its rating), or [0] when the model reads none.
    host_lengths: [B] int64 `seq` lengths kept on the host (`to()` never moves them): the encoders plan
                their padding and length groups from them without reading the device.
    """

    ids: KeyedJaggedTensor
    timestamps: torch.Tensor
    neg_index: torch.Tensor
    hit: torch.Tensor
    weights: torch.Tensor
    users: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    actions: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    host_lengths: torch.Tensor | None = None

    def _map(self, fn) -> RetrievalBatch:  # noqa: ANN001 - fn: tensor-like -> tensor-like
        return replace(self, ids=fn(self.ids), timestamps=fn(self.timestamps), neg_index=fn(self.neg_index),
                       hit=fn(self.hit), weights=fn(self.weights), users=fn(self.users), actions=fn(self.actions))

    def to(self, device: torch.device, non_blocking: bool = False) -> RetrievalBatch:
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        for t in (self.timestamps, self.neg_index, self.hit, self.weights, self.users, self.actions):
            t.record_stream(stream)
        self.ids.record_stream(stream)

    def pin_memory(self) -> RetrievalBatch:
        return self._map(lambda t: t.pin_memory())


def item_kjt(seq: np.ndarray, seq_lengths: np.ndarray, neg: np.ndarray) -> KeyedJaggedTensor:
    """KJT ["seq", "neg"] with stride len(seq_lengths); all `neg` ids on row 0."""
    b = len(seq_lengths)
    neg_lengths = np.zeros(b, dtype=np.int64)
    neg_lengths[0] = len(neg)
    values = np.concatenate([seq, neg]).astype(np.int64)
    lengths = np.concatenate([seq_lengths, neg_lengths]).astype(np.int32)
    return KeyedJaggedTensor(keys=FEATURES, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths),
                             stride=b)


def targets(w: Window) -> np.ndarray:
    """Positive id of every position: each row's tokens[1:], concatenated ([P])."""
    first = np.zeros(len(w.items), dtype=bool)
    first[np.concatenate([[0], np.cumsum(w.lengths)[:-1]])] = True
    return w.items[~first]


def _distinct(ids: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct ids, index of each id in them) for ids in [0, size), linear time."""
    present = np.zeros(size, dtype=bool)
    present[ids] = True
    slot = np.cumsum(present) - 1
    return np.nonzero(present)[0], slot[ids]


class NegativeSampler:
    """R negatives per position: uniform over the corpus, or uniform over the batch's distinct targets.

    The second is the reference's in-batch sampler (deduplicated, so not popularity-weighted). Draws
    are seeded by (seed, epoch, rank, batch), so a resumed run samples the same negatives.
    """

    def __init__(self, corpus: np.ndarray, num_negatives: int, kind: str, num_embeddings: int,
                 seed: int) -> None:
        self.corpus, self.r, self.kind, self.seed = corpus, num_negatives, kind, seed
        self.size = num_embeddings

    def __call__(self, pos: np.ndarray, epoch: int, rank: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """pos [P] -> (candidate ids [U], neg_index [P, R])."""
        rng = np.random.default_rng([self.seed, epoch, rank, batch])
        if self.kind == "uniform":
            ids = self.corpus[rng.integers(0, len(self.corpus), size=(len(pos), self.r))]
            return _distinct(ids, self.size)
        cand, _ = _distinct(pos, self.size)
        return cand, rng.integers(0, len(cand), size=(len(pos), self.r))


def train_batch(w: Window, sampler: NegativeSampler, epoch: int, rank: int, batch: int) -> RetrievalBatch:
    pos = targets(w)
    cand, neg_index = sampler(pos, epoch, rank, batch)
    return RetrievalBatch(
        ids=item_kjt(w.items, w.lengths, cand), timestamps=torch.from_numpy(w.timestamps),
        neg_index=torch.from_numpy(neg_index.astype(np.int64)),
        hit=torch.from_numpy(cand[neg_index] == pos[:, None]),
        weights=torch.full((len(w.lengths),), w.weight), users=torch.from_numpy(w.users),
        actions=torch.from_numpy(w.actions), host_lengths=torch.from_numpy(w.lengths.astype(np.int64)))


def eval_batch(w: Window) -> RetrievalBatch:
    """Windows whose last token is the target; no negatives ([P, 0] placeholders)."""
    p = int(w.lengths.sum()) - len(w.lengths)
    return RetrievalBatch(
        ids=item_kjt(w.items, w.lengths, np.zeros(0, dtype=np.int64)),
        timestamps=torch.from_numpy(w.timestamps), neg_index=torch.zeros(p, 0, dtype=torch.long),
        hit=torch.zeros(p, 0, dtype=torch.bool),
        weights=torch.full((len(w.lengths),), w.weight), users=torch.from_numpy(w.users),
        actions=torch.from_numpy(w.actions), host_lengths=torch.from_numpy(w.lengths.astype(np.int64)))
