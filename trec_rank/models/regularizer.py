"""DIN's mini-batch-aware L2 regulariser (Zhou et al., KDD 2018, eq. 4).

Full L2 over embedding tables touches every row each step, which is infeasible for sparse inputs
with hundreds of millions of ids and, with TorchRec's fused in-backward optimizers, impossible from
the dense side (the table weights are not an autograd leaf the dense loss can see). The paper's
approximation penalises only the rows used by the mini-batch:

    L2 = lambda * sum_{j unique in batch} ||w_j||^2 / n_j,     n_j = frequency of id j in training data

It is computed here from the looked-up rows (the EmbeddingCollection / EmbeddingBagCollection
outputs), so its gradient 2 lambda w_j / n_j flows back through the lookup into the fused
optimizer exactly like the task loss. An id looked up c_j times in the batch contributes
c_j occurrences each weighted 1/(n_j c_j): the sum over occurrences equals the sum over unique ids.

Pooled (EBC) outputs equal a table row only for bags of exactly one id, so multi-id bags of pooled
features are skipped; every id of an EmbeddingCollection feature is covered.
Zero-weight rows (lockstep padding) add nothing.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from trec_rank.config.encoder import L2Params
from trec_rank.config.schema import Schema
from trec_rank.data.batch import Batch
from trec_rank.models.embeddings import segment_ids


class MiniBatchL2(nn.Module):
    """(pooled, jagged, batch) -> scalar lambda * sum_j ||w_j||^2 / n_j over the batch's unique ids.

    The counts n_j (table -> int counts [table_rows], `trec_rank.data.frequency`) are data I/O, so
    the model never reads them itself: the trainer counts and hands them in (`counts`, set by
    `registry.build_model(..., id_counts=)`); a model built for planning, eval or scoring has none
    and never needs them. The inverse frequencies are kept as plain tensors on the device of the
    first batch, not as buffers: DMP would zero-fill a meta buffer, and they are data, not learned state.

    Every counted table lives in one global row space (table t's row j is `start[t] + j`), so the
    whole batch, every feature of every table, is one vector of occurrences [M] and the penalty is a
    fixed, small number of ops per step: a loop over features and tables cost ~300 small ops, a
    sixth of DIN's step at batch 256.
    """

    def __init__(self, schema: Schema, params: L2Params, key: str = "model.params.encoder.l2") -> None:
        super().__init__()
        self.tables = params.counted_tables(schema, key)
        self.table_of = {f.name: f.table for f in schema.features
                         if f.kind in ("sparse", "sequence") and f.table in self.tables}
        self.weight = params.weight
        self._counts: dict[str, np.ndarray] | None = None
        self._inv_freq: torch.Tensor | None = None  # [sum of counted table rows], float32
        self._start: dict[str, int] = {}  # table -> its first row in the global row space
        self._layouts: dict[tuple, tuple[torch.Tensor, ...]] = {}  # per KJT key order and device

    @property
    def counts(self) -> dict[str, np.ndarray] | None:
        return self._counts

    @counts.setter
    def counts(self, counts: dict[str, np.ndarray] | None) -> None:
        """Builds the global row space here, once, outside any training step (and any compiled graph)."""
        self._counts, self._layouts = counts, {}
        if counts is None:
            self._inv_freq = None
            return
        rows = [len(counts[t]) for t in self.tables]
        self._start = dict(zip(self.tables, np.cumsum([0, *rows[:-1]]).tolist(), strict=True))
        n = np.concatenate([np.maximum(counts[t], 1) for t in self.tables])  # unseen ids: n_j = 1
        self._inv_freq = 1.0 / torch.from_numpy(n).to(torch.float32)

    def _global(self, device: torch.device) -> torch.Tensor:
        """1 / n_j of every counted table, concatenated, on `device` (moved there once)."""
        assert self._inv_freq is not None, "training with the L2 needs build_model(..., id_counts=...)"
        if self._inv_freq.device != device:
            self._inv_freq = self._inv_freq.to(device)
        return self._inv_freq

    def inverse_frequency(self, table: str, device: torch.device) -> torch.Tensor:
        """1 / n_j of one table [table_rows]."""
        assert self._counts is not None
        return self._global(device)[self._start[table]:self._start[table] + len(self._counts[table])]

    def _keys(self, keys: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(counted [K] 0/1, global start row [K]) of a KJT's keys; keys of other tables count 0."""
        cache = ("keys", tuple(keys), device)
        if cache not in self._layouts:
            self._layouts[cache] = (
                torch.tensor([1.0 if k in self.table_of else 0.0 for k in keys], device=device),
                torch.tensor([self._start[self.table_of[k]] if k in self.table_of else 0 for k in keys], device=device))
        counted, start = self._layouts[cache]
        return counted, start

    def _columns(self, pooled: KeyedTensor, keys: list[str], device: torch.device) -> torch.Tensor:
        """[sum D]: for each column of pooled.values(), its feature's position in the sparse KJT's `keys`.

        A sharded EBC orders its output by sharding type, so the map follows the KeyedTensor's own keys."""
        cache = ("columns", tuple(pooled.keys()), tuple(keys), device)
        if cache not in self._layouts:
            where = {k: i for i, k in enumerate(keys)}
            cols = [where[k] for k, d in zip(pooled.keys(), pooled.length_per_key(), strict=True) for _ in range(d)]
            self._layouts[cache] = (torch.tensor(cols, device=device),)
        return self._layouts[cache][0]

    def _pooled(self, pooled: KeyedTensor, batch: Batch, live: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """EBC features: a pooled row equals a table row only for a bag of exactly one id, so other bags
        are masked (not selected: no data-dependent shapes). -> (global ids, keep, ||row||^2), each [K*B]."""
        kjt, b = batch.sparse, live.numel()
        keys = kjt.keys()
        counted, start = self._keys(keys, live.device)
        values = torch.cat([kjt.values(), kjt.values().new_zeros(1)])  # an empty last bag's start is in range
        first = values[kjt.offsets()[:-1]].view(len(keys), b)  # [K, B]: each bag's first id
        keep = ((kjt.lengths().view(len(keys), b) == 1).to(live.dtype) * counted.unsqueeze(1) * live).flatten()
        ids = torch.where(keep > 0, (first + start.unsqueeze(1)).flatten(), 0)
        per_key = live.new_zeros(b, len(keys)).index_add_(1, self._columns(pooled, keys, live.device),
                                                          pooled.values().pow(2))  # [B, K]
        return ids, keep, per_key.t().flatten()

    def _sequence(self, jagged: dict[str, JaggedTensor], batch: Batch, live: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """EC features: every id in a live row. -> (global ids, keep, ||row||^2), each [N] (jagged)."""
        kjt, b = batch.sequence, live.numel()
        keys = kjt.keys()
        counted, start = self._keys(keys, live.device)
        values = kjt.values()  # [N]: the keys' ids one after another, as the EC's outputs
        bag = segment_ids(kjt.lengths(), values.numel())  # [N] -> bag (key-major, K*B bags)
        keep = (counted.unsqueeze(1) * live).flatten()[bag]
        ids = torch.where(keep > 0, values + start.unsqueeze(1).expand(-1, b).flatten()[bag], 0)
        rows = torch.cat([jagged[k].values() for k in keys])  # [N, D]: one EC, so one embedding width
        return ids, keep, rows.pow(2).sum(dim=1)

    def forward(self, pooled: KeyedTensor | None, jagged: dict[str, JaggedTensor] | None,
                batch: Batch) -> torch.Tensor:
        inv_freq = self._global(batch.dense.device)
        live = (batch.weights > 0).to(torch.float32)  # zero-weight rows (lockstep padding) add nothing
        parts = []
        if pooled is not None and batch.sparse.keys():
            parts.append(self._pooled(pooled, batch, live))
        if jagged is not None and batch.sequence.keys():
            parts.append(self._sequence(jagged, batch, live))
        if not parts:
            return batch.dense.new_zeros(())
        ids, keep, sq = (torch.cat(x) for x in zip(*parts, strict=True))
        scale = inv_freq[ids] / occurrences_per_id(ids, keep, inv_freq.numel()).clamp(min=1.0)  # 1/(n_j c_j)
        return self.weight * (scale * keep * sq).sum()


# A count over the table's rows is the cheapest while the table is small next to the batch; past
# this many rows per occurrence it would allocate and scan a table-sized vector every step, so the count
# sorts the batch's own ids instead and the step's cost stays flat however large the table grows.
DENSE_COUNT_ROWS_PER_ID = 64


def occurrences_per_id(ids: torch.Tensor, keep: torch.Tensor, table_rows: int) -> torch.Tensor:
    """c_j for each occurrence: ids [M] (rows of one table, every feature on it), keep [M] 0/1 weights ->
    [M], the kept occurrences in the batch of the id at each position."""
    if table_rows <= DENSE_COUNT_ROWS_PER_ID * max(ids.numel(), 1):
        # index_add_ into a table-sized vector, not bincount: bincount sizes its output from max(ids), a
        # host read per step on a GPU; the sums are whole numbers, exact in any order
        return keep.new_zeros(table_rows).index_add_(0, ids, keep)[ids]
    # sort, then each id's run of equal ids in the sorted order: no data-dependent shape, so no host sync
    order = torch.argsort(ids)
    ordered = ids[order]
    kept = torch.cat([keep.new_zeros(1), torch.cumsum(keep[order], 0)])  # kept occurrences before each position
    first = torch.searchsorted(ordered, ids)
    end = torch.searchsorted(ordered, ids, right=True)
    return kept[end] - kept[first]
