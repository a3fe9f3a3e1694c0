"""The unit of work between the data layer and every model: one `Batch`.

TorchRec's TrainPipelineSparseDist moves batches between devices and streams, so `Batch`
implements the `Pipelineable` contract (`to`, `record_stream`, `pin_memory`). Sharded modules
take plain attributes of it (`model.ebc(batch.sparse)`), which keeps the model fx-traceable.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    """B rows of training/eval/scoring input.

    dense:     [B, n_dense] float32, padded-free (every row has every dense feature).
    sparse:    KJT (jagged) of the features pooled by the EmbeddingBagCollection; stride B.
    sequence:  KJT (jagged) of the features looked up by the EmbeddingCollection (histories, and
               sparse features whose table a history shares); stride B; ids in time order.
    side:      "<feature>/<side>" -> 1-D tensor aligned element by element with that feature's
               values in `sequence` (jagged values; the lengths are the feature's lengths).
    labels:    task -> [B] float32 (empty when scoring unlabeled data).
    weights:   [B] float32; 1 for real rows, 0 for lockstep padding rows that metrics must ignore.
    row_index: [B] int64, the row's stable position in the dataset (file order, then row), for
               exactly-once checks and joining scores back to inputs.
    host_lengths: sequence feature -> its lengths [B] int64, kept on the host: `to()` never moves
               them. Encoders that plan on the host (HSTU's length groups, SASRec's padded length)
               read them instead of copying the device lengths back, a stall on every GPU step.
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    sequence: KeyedJaggedTensor
    side: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    row_index: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    host_lengths: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.dense.shape[0])

    def _map(self, fn) -> Batch:  # noqa: ANN001 - fn: tensor-like -> tensor-like
        return replace(
            self,
            dense=fn(self.dense),
            sparse=fn(self.sparse),
            sequence=fn(self.sequence),
            side={k: fn(v) for k, v in self.side.items()},
            labels={k: fn(v) for k, v in self.labels.items()},
            weights=fn(self.weights),
            row_index=fn(self.row_index),
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        """The batch on `device`; itself when already there, as `Tensor.to` (the loader builds every
        tensor of a batch on one device, so the dense tensor and the KJTs tell where all of it is)."""
        target = torch.device(device)
        if all(d == target for d in (self.dense.device, self.sparse.device(), self.sequence.device())):
            return self
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        for t in (self.dense, self.weights, self.row_index, *self.side.values(), *self.labels.values()):
            t.record_stream(stream)
        self.sparse.record_stream(stream)
        self.sequence.record_stream(stream)

    def pin_memory(self) -> Batch:
        return self._map(lambda t: t.pin_memory())

    def with_zero_weights(self) -> Batch:
        """A copy that contributes nothing to losses or metrics (lockstep padding)."""
        return replace(self, weights=torch.zeros_like(self.weights))
