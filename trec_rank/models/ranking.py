"""The model shape every ranking model shares, and its training wrapper.

`RankingModel.forward(batch)` hands the sharded modules plain attributes of the batch
(`self.ebc(batch.sparse)`), the contract TrainPipelineSparseDist needs to pipeline their input
distribution; everything after them lives in one over-arch module, which the pipeline's tracer
treats as a leaf, so over-arches may use any Python. Over-arches return logits by task and may
add an auxiliary loss under the key `AUX_LOSS` (DIN's regulariser, the feedback term).

Auxiliary terms can need more than embeddings: DIN's mini-batch-aware L2 needs the looked-up ids,
every aux term needs the row weights (lockstep padding rows add nothing), the naive ESMM baseline
needs labels. Such over-arches set `needs_batch = True` and also receive `batch=`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trec_rank.data.batch import Batch

AUX_LOSS = "_aux_loss"


class RankingModel(nn.Module):
    def __init__(self, ebc: nn.Module | None, ec: nn.Module | None, over: nn.Module) -> None:
        super().__init__()
        self.ebc, self.ec, self.over = ebc, ec, over
        self.needs_batch = bool(getattr(over, "needs_batch", False))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        pooled = self.ebc(batch.sparse) if self.ebc is not None else None
        jagged = self.ec(batch.sequence) if self.ec is not None else None
        if self.needs_batch:
            return self.over(pooled, jagged, batch.dense, batch.side, batch=batch)
        return self.over(pooled, jagged, batch.dense, batch.side)


class TaskLoss(nn.Module):
    """Sum over tasks of weight_t x weighted-mean BCE; rows with weight 0 (padding) add nothing.

    All tasks in one BCE over the stacked [T, B] logits: a handful of ops whatever T is, where a loop
    over tasks dispatched six per task, forward and backward (a visible share of a small model's step)."""

    def __init__(self, tasks: list[str], loss_weights: dict[str, float]) -> None:
        super().__init__()
        assert tasks, "the loss needs at least one task"
        self.tasks = tasks
        self.task_weights = {t: float(loss_weights.get(t, 1.0)) for t in tasks}
        self._unit = all(w == 1.0 for w in self.task_weights.values())  # rows weigh alike in every task
        self._scale: dict[torch.device, torch.Tensor] = {}  # device -> [T, 1] task weights; not state

    def _row_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """[B] row weights -> [T, B] (or [B], broadcast, when every task weighs 1)."""
        if self._unit:
            return weights
        if weights.device not in self._scale:
            self._scale[weights.device] = torch.tensor([[self.task_weights[t]] for t in self.tasks],
                                                       device=weights.device)
        return self._scale[weights.device] * weights

    def forward(self, logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
                weights: torch.Tensor) -> torch.Tensor:
        x = torch.stack([logits[t] for t in self.tasks])  # [T, B]
        y = torch.stack([labels[t] for t in self.tasks]).to(x.dtype)  # [T, B]
        loss = F.binary_cross_entropy_with_logits(x, y, weight=self._row_weights(weights), reduction="sum")
        loss = loss / weights.sum().clamp(min=1.0)
        if AUX_LOSS in logits:
            loss = loss + logits[AUX_LOSS]
        return loss


class TrainWrapper(nn.Module):
    """batch -> (loss, (loss.detach(), logits_by_task, labels_by_task)), TorchRec's convention."""

    def __init__(self, model: nn.Module, tasks: list[str], loss_weights: dict[str, float]) -> None:
        super().__init__()
        self.model = model
        self.loss = TaskLoss(tasks, loss_weights)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, dict, dict]]:
        logits = self.model(batch)
        loss = self.loss(logits, batch.labels, batch.weights)
        return loss, (loss.detach(), logits, batch.labels)
