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
    """

    def __init__(self, schema: Schema, params: L2Params, key: str = "model.params.encoder.l2") -> None:
        super().__init__()
        self.tables = params.counted_tables(schema, key)
        seq = {f.name for f in schema.sequence_features}
        self.features = [(f.name, f.table, f.name in seq) for f in schema.features
                         if f.kind in ("sparse", "sequence") and f.table in self.tables]
        self.weight = params.weight
        self.counts: dict[str, np.ndarray] | None = None
        self._inv_freq: dict[str, torch.Tensor] = {}

    def inverse_frequency(self, table: str, device: torch.device) -> torch.Tensor:
        """1 / n_j as float32 [table_rows]; ids never seen in training get n_j = 1."""
        if not self._inv_freq or next(iter(self._inv_freq.values())).device != device:
            assert self.counts is not None, "training with the L2 needs build_model(..., id_counts=...)"
            counts = self.counts
            self._inv_freq = {t: 1.0 / torch.from_numpy(np.maximum(counts[t], 1)).to(device, torch.float32)
                              for t in self.tables}
        return self._inv_freq[table]

    def _occurrences(self, name: str, in_sequence: bool, pooled: KeyedTensor | None,
                     jagged: dict[str, JaggedTensor] | None, batch: Batch
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids [M], looked-up rows [M, D], keep [M] float: 1 for the occurrences the penalty covers) of one
        feature.

        Sequence occurrences are masked by `keep` rather than selected: boolean indexing of the
        [N, D] rows, and its index_put backward, cost more than the whole penalty."""
        if in_sequence:
            assert jagged is not None, name
            ids, lengths = batch.seq_feature(name)
            rows = jagged[name].values()
            keep = (batch.weights[segment_ids(lengths, rows.shape[0])] > 0).to(rows.dtype)
            return ids, rows, keep
        kjt = batch.sparse[name]
        keep = (kjt.lengths() == 1) & (batch.weights > 0)
        assert pooled is not None, name
        rows = pooled[name]  # [B, D]; bags that are not exactly one id are masked, not selected (no sync)
        values = torch.cat([kjt.values(), kjt.values().new_zeros(1)])  # an empty last bag's start is in range
        return values[kjt.offsets()[:-1]], rows, keep.to(rows.dtype)

    def forward(self, pooled: KeyedTensor | None, jagged: dict[str, JaggedTensor] | None,
                batch: Batch) -> torch.Tensor:
        by_table: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        for name, table, in_sequence in self.features:
            by_table.setdefault(table, []).append(self._occurrences(name, in_sequence, pooled, jagged, batch))
        total = batch.dense.new_zeros(())
        for table, parts in by_table.items():
            inv_freq = self.inverse_frequency(table, batch.dense.device)
            ids, keep = torch.cat([i for i, _, _ in parts]), torch.cat([k for _, _, k in parts])
            scale = inv_freq[ids] / occurrences_per_id(ids, keep, inv_freq.numel()).clamp(min=1.0)  # 1/(n_j c_j)
            for (_, rows, k), s in zip(parts, scale.split([i.numel() for i, _, _ in parts]), strict=True):
                total = total + (s * k * rows.pow(2).sum(dim=1)).sum()
        return self.weight * total


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
