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

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from trec_rank.config.models import EsmmParams
from trec_rank.config.schema import Schema
from trec_rank.config.typed import ConfigError
from trec_rank.data.batch import Batch
from trec_rank.models.dice import make_activation
from trec_rank.models.encoder import FeatureEncoder
from trec_rank.models.layers import MLP
from trec_rank.models.ranking import AUX_LOSS


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

    def __init__(self, schema: Schema, tasks: list[str], params: EsmmParams, device: torch.device) -> None:
        """`params` were checked against `tasks` at load (EsmmParams.check_tasks)."""
        super().__init__()
        if params.cvr_output == AUX_LOSS:
            raise ConfigError(f"model.params.cvr_output: '{AUX_LOSS}' is the aux-loss key")
        self.params = params
        act = make_activation(params.activation, device)
        self.encoder = FeatureEncoder(schema, params.encoder, device)
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
