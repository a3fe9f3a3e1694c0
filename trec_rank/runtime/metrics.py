"""Evaluation metrics per task, aggregated across ranks.

AUC, NE, calibration and CTR come from `torchrec.metrics` (RecMetricModule, synchronised over the
process group). GAUC and logloss are computed exactly here: torchrec's GAUC needs each group's
rows contiguous inside one batch, which a loader that cuts by row group cannot promise, so rows
(group, prediction, label, weight) are gathered and each group's AUC is computed once. Subset AUCs
(`SubsetAUC`) score a non-task output on the rows where another task's label is 1, exactly too:
ESMM's `cvr/auc` is the AUC of pCVR against conversion over the clicked rows only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchrec.metrics.metric_module import RecMetricModule, generate_metric_module
from torchrec.metrics.metrics_config import MetricsConfig, RecMetricDef, RecMetricEnum, RecTaskInfo

from trec_rank.config.experiment import ExperimentConfig

TORCHREC_METRICS = {"auc": (RecMetricEnum.AUC, "window_auc"), "ne": (RecMetricEnum.NE, "lifetime_ne"),
                    "calibration": (RecMetricEnum.CALIBRATION, "lifetime_calibration"),
                    "ctr": (RecMetricEnum.CTR, "lifetime_ctr")}


def grouped_auc(groups: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-group ROC AUC (ties get average ranks), vectorised over groups.

    Returns (auc per group that has both classes, that group's row count)."""
    order = np.lexsort((scores, groups))
    g, s, y = groups[order], scores[order], labels[order] > 0.5
    n = len(g)
    g_start = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]
    pos_in_group = np.arange(n) - np.repeat(g_start, np.diff(np.r_[g_start, n])) + 1.0
    run_start = np.r_[0, np.flatnonzero((g[1:] != g[:-1]) | (s[1:] != s[:-1])) + 1]
    run_len = np.diff(np.r_[run_start, n])
    ranks = np.repeat(np.add.reduceat(pos_in_group, run_start) / run_len, run_len)
    n_pos = np.add.reduceat(y.astype(np.float64), g_start)
    n_all = np.diff(np.r_[g_start, n]).astype(np.float64)
    n_neg = n_all - n_pos
    rank_sum = np.add.reduceat(np.where(y, ranks, 0.0), g_start)
    valid = (n_pos > 0) & (n_neg > 0)
    auc = (rank_sum[valid] - n_pos[valid] * (n_pos[valid] + 1) / 2) / (n_pos[valid] * n_neg[valid])
    return auc, n_all[valid]


def gauc(groups: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> float:
    """Impression-weighted mean of per-group AUC over groups with both classes (DIN, KDD'18)."""
    auc, weight = grouped_auc(groups, scores, labels)
    return float((auc * weight).sum() / weight.sum()) if weight.sum() > 0 else float("nan")


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC (ties get average ranks); nan unless both classes occur."""
    value, _ = grouped_auc(np.zeros(len(scores), dtype=np.int64), scores, labels)
    return float(value[0]) if len(value) else float("nan")


@dataclass(frozen=True)
class SubsetAUC:
    """`<output>/auc`: AUC of sigmoid(logits[output]) against labels[label] over rows with labels[given] = 1.

    Why: ESMM's pCVR is trained only through pCTCVR on the entire space, yet it is a conversion rate
    *given a click*; its own quality shows on the clicked rows, where the ctcvr label is the
    conversion (click AND conversion = conversion when click = 1)."""

    output: str
    label: str
    given: str


def subset_aucs(cfg: ExperimentConfig) -> list[SubsetAUC]:
    """The subset AUCs the configured model declares through its params' `subset_aucs()` (ESMM: pCVR
    on clicked rows); an empty list for models that declare none."""
    declared = getattr(cfg.model.typed_params, "subset_aucs", None)
    return [SubsetAUC(*spec) for spec in declared()] if declared is not None else []


class EvalMetrics:
    """Accumulate one eval pass; `compute()` is collective (call it on every rank).

    Every tensor a collective touches lives on `device` (NCCL takes CUDA tensors only). torchrec
    splits a metric's window evenly over the ranks and needs each share to hold a batch; a share of
    `window_rows + batch_size` holds everything any rank can see of a `window_rows` split, at any
    world size (the window only caps how many rows are kept)."""

    def __init__(self, tasks: list[str], batch_size: int, world_size: int, rank: int, device: torch.device,
                 window_rows: int, subsets: Sequence[SubsetAUC] = ()) -> None:
        self.tasks, self.device, self.subsets = tasks, device, list(subsets)
        cfg = MetricsConfig(
            rec_tasks=[RecTaskInfo(name=t, label_name=f"{t}-label", prediction_name=f"{t}-pred",
                                   weight_name=f"{t}-weight") for t in tasks],
            rec_metrics={enum: RecMetricDef(rec_task_indices=list(range(len(tasks))),
                                            window_size=world_size * (window_rows + batch_size))
                         for enum, _ in TORCHREC_METRICS.values()})
        self.module: RecMetricModule = generate_metric_module(
            RecMetricModule, cfg, batch_size=batch_size, world_size=world_size, my_rank=rank,
            state_metrics_mapping={}, device=device)
        self.rows: dict[str, list[np.ndarray]] = {"group": []}
        for t in tasks:
            self.rows[f"{t}-pred"], self.rows[f"{t}-label"] = [], []
        for sub in self.subsets:
            self.rows[f"{sub.output}-subset-pred"], self.rows[f"{sub.output}-subset-label"] = [], []
        self.logloss = {t: torch.zeros(2, dtype=torch.float64, device=device) for t in tasks}

    def update(self, logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], weights: torch.Tensor,
               groups: torch.Tensor | None) -> None:
        out = {}
        for t in self.tasks:
            pred = torch.sigmoid(logits[t].detach().float())
            out.update({f"{t}-pred": pred, f"{t}-label": labels[t].float(), f"{t}-weight": weights.float()})
            bce = F.binary_cross_entropy_with_logits(logits[t].detach().float(), labels[t].float(), reduction="none")
            self.logloss[t] += torch.stack([(bce * weights).sum(), weights.sum()]).double().to(self.device)
            keep = (weights > 0).cpu().numpy()
            self.rows[f"{t}-pred"].append(pred.cpu().numpy()[keep])
            self.rows[f"{t}-label"].append(labels[t].float().cpu().numpy()[keep])
        if groups is not None:
            self.rows["group"].append(groups.cpu().numpy()[keep])
        for sub in self.subsets:  # rows with weight > 0 whose `given` label is 1
            rows = ((weights > 0) & (labels[sub.given] > 0.5)).cpu().numpy()
            self.rows[f"{sub.output}-subset-pred"].append(
                torch.sigmoid(logits[sub.output].detach().float()).cpu().numpy()[rows])
            self.rows[f"{sub.output}-subset-label"].append(labels[sub.label].float().cpu().numpy()[rows])
        self.module.update({k: v.to(self.device) for k, v in out.items()})

    def _gathered(self, key: str) -> np.ndarray:
        local = np.concatenate(self.rows[key]) if self.rows[key] else np.zeros(0)
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return local
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
        return np.concatenate(parts)

    def compute(self) -> dict[str, float]:
        raw = self.module.compute()
        result: dict[str, float] = {}
        have_groups = bool(self.rows["group"])
        groups = self._gathered("group") if have_groups else None
        for t in self.tasks:
            for name, (enum, suffix) in TORCHREC_METRICS.items():
                key = f"{enum.value}-{t}|{suffix}"
                result[f"{t}/{name}"] = float(raw[key]) if key in raw else float("nan")
            ll = self.logloss[t].clone()
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(ll)
            result[f"{t}/logloss"] = float(ll[0] / ll[1].clamp(min=1e-12))
            if groups is not None:
                result[f"{t}/gauc"] = gauc(groups, self._gathered(f"{t}-pred"), self._gathered(f"{t}-label"))
        for sub in self.subsets:
            result[f"{sub.output}/auc"] = auc(self._gathered(f"{sub.output}-subset-pred"),
                                             self._gathered(f"{sub.output}-subset-label"))
        return result
