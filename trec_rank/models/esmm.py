"""Entire Space Multi-task Model (Ma et al., SIGIR 2018): CVR learned over all impressions.

A CVR model trained on clicked rows only sees a biased sample (sample selection bias) and few
positives (data sparsity), yet it is served on every impression. ESMM shares the feature encoder
between a CTR tower and a CVR tower and supervises only quantities defined on the entire
impression space:

    pCTR = sigmoid(a),  pCVR = sigmoid(b),  pCTCVR = pCTR * pCVR
    loss = BCE(pCTR, click) + BCE(pCTCVR, click AND conversion)     over ALL impressions

so the CVR tower is never fitted to the click space directly. Here click = `watch`, conversion =
`like` on data/ml-100k/funnel. To reuse the per-task BCE-with-logits loss, the over-arch returns the
logit of pCTCVR under the ctcvr task; it is exact and stable in closed form:
logit(sigmoid(a) sigmoid(b)) = -logsumexp(-a, -b, -a-b). The pCVR logit is returned under a
non-task key (default "cvr") for scoring; losses and metrics only iterate the model's tasks.

`variant: naive` is the baseline the paper argues against: same towers, but the CVR tower is trained
with BCE on watched rows only (an auxiliary loss; the ctcvr task's loss weight must be 0), and
pCTCVR = pCTR * pCVR is still what gets evaluated on the exposure space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from trec_rank.config.experiment import ExperimentConfig
from trec_rank.config.typed import ConfigError
from trec_rank.data.batch import Batch
from trec_rank.models.dice import Activation, make_activation
from trec_rank.models.encoder import EncoderParams, FeatureEncoder
from trec_rank.models.layers import MLP
from trec_rank.models.ranking import AUX_LOSS

KEY = "model.params"


@dataclass
class EsmmParams:
    encoder: EncoderParams = field(default_factory=EncoderParams)
    tower_hidden: list[int] = field(default_factory=lambda: [200, 80])
    activation: Activation = "relu"
    dropout: float = 0.0
    ctr_task: str = "watch"
    ctcvr_task: str = "like"
    cvr_output: str = "cvr"
    variant: Literal["esmm", "naive"] = "esmm"

    def subset_aucs(self) -> list[tuple[str, str, str]]:
        """(output, label task, given task) for the trainer's subset AUCs: `<cvr_output>/auc` is
        pCVR against the ctcvr label on clicked rows (ctr label 1), where that label is the conversion."""
        return [(self.cvr_output, self.ctcvr_task, self.ctr_task)]


def ctcvr_logit(ctr_logit: torch.Tensor, cvr_logit: torch.Tensor) -> torch.Tensor:
    """logit(sigmoid(a) * sigmoid(b)) = -log(e^-a + e^-b + e^-(a+b)); finite for any finite a, b."""
    a, b = ctr_logit, cvr_logit
    return -torch.logsumexp(torch.stack([-a, -b, -(a + b)]), dim=0)


def click_space_bce(cvr_logit: torch.Tensor, conversion: torch.Tensor, click: torch.Tensor,
                    row_weights: torch.Tensor) -> torch.Tensor:
    """Naive CVR loss: mean BCE over clicked rows with weight > 0 (zero if the batch has none)."""
    mask = (click > 0.5).to(cvr_logit.dtype) * (row_weights > 0).to(cvr_logit.dtype)
    bce = F.binary_cross_entropy_with_logits(cvr_logit, conversion, reduction="none")
    return (bce * mask).sum() / mask.sum().clamp(min=1.0)


class EsmmOverArch(nn.Module):
    """(pooled, jagged, dense, side[, batch]) -> {ctr_task: a, ctcvr_task: logit(pCTR pCVR),
    "ctcvr": the same, cvr_output: b} (+ AUX_LOSS in training), all logits [B]."""

    def __init__(self, cfg: ExperimentConfig, params: EsmmParams, device: torch.device) -> None:
        super().__init__()
        tasks = cfg.model.tasks
        for name in ("ctr_task", "ctcvr_task"):
            if getattr(params, name) not in tasks:
                raise ConfigError(f"{KEY}.{name}: '{getattr(params, name)}' is not a task of the model "
                                  f"({tasks})")
        if params.ctr_task == params.ctcvr_task:
            raise ConfigError(f"{KEY}.ctcvr_task: must differ from ctr_task '{params.ctr_task}'")
        if sorted(tasks) != sorted([params.ctr_task, params.ctcvr_task]):
            raise ConfigError(f"model.tasks: ESMM predicts exactly [{params.ctr_task}, {params.ctcvr_task}], "
                              f"got {tasks}")
        if params.cvr_output in (*tasks, AUX_LOSS):
            raise ConfigError(f"{KEY}.cvr_output: '{params.cvr_output}' collides with a task or the "
                              "aux-loss key")
        if params.variant == "naive" and cfg.train.loss_weights.get(params.ctcvr_task, 1.0) != 0.0:
            raise ConfigError(f"train.loss_weights.{params.ctcvr_task}: must be 0 for variant 'naive' "
                              "(its CVR tower learns from watched rows only, not from the pCTCVR loss)")
        self.params = params
        act = make_activation(params.activation, device)
        self.encoder = FeatureEncoder(cfg, params.encoder, device)
        self.ctr = MLP(self.encoder.out_dim, params.tower_hidden, params.dropout, device, act)
        self.cvr = MLP(self.encoder.out_dim, params.tower_hidden, params.dropout, device, act)
        self.ctr_head = nn.Linear(self.ctr.out_dim, 1, device=device)
        self.cvr_head = nn.Linear(self.cvr.out_dim, 1, device=device)

    @property
    def needs_batch(self) -> bool:
        return self.encoder.needs_batch or self.params.variant == "naive"

    def forward(self, pooled: KeyedTensor | None, jagged: dict[str, JaggedTensor] | None, dense: torch.Tensor,
                side: dict[str, torch.Tensor], batch: Batch | None = None) -> dict[str, torch.Tensor]:
        p = self.params
        enc = self.encoder(pooled, jagged, dense, batch)
        a = self.ctr_head(self.ctr(enc.h)).squeeze(-1)
        b = self.cvr_head(self.cvr(enc.h)).squeeze(-1)
        out = {p.ctr_task: a, p.ctcvr_task: ctcvr_logit(a, b), p.cvr_output: b}
        out.setdefault("ctcvr", out[p.ctcvr_task])  # scoring writes p_ctcvr under its usual name too
        aux = [] if enc.aux is None else [enc.aux]
        if p.variant == "naive" and self.training and batch is not None:
            labels = batch.labels
            aux.append(click_space_bce(b, labels[p.ctcvr_task], labels[p.ctr_task], batch.weights))
        if aux:
            out[AUX_LOSS] = sum(aux)
        return out
