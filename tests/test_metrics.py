"""Metric equations: exact grouped AUC against a brute-force pair count, torchrec AUC against it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trec_rank.runtime.metrics import EvalMetrics, gauc, grouped_auc


def brute_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_grouped_auc_matches_brute_force_with_ties() -> None:
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 30, 2000)
    scores = np.round(rng.random(2000), 2)  # many ties
    labels = (rng.random(2000) < 0.3 + 0.4 * scores).astype(np.float32)
    auc, weight = grouped_auc(groups, scores, labels)
    expected, sizes = [], []
    for g in np.unique(groups):
        m = groups == g
        if 0 < labels[m].sum() < m.sum():
            expected.append(brute_auc(scores[m], labels[m]))
            sizes.append(m.sum())
    np.testing.assert_allclose(auc, expected, atol=1e-12)
    np.testing.assert_allclose(weight, sizes)
    assert gauc(groups, scores, labels) == pytest.approx(np.average(expected, weights=sizes))


def test_single_class_groups_are_skipped() -> None:
    groups = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.9, 0.3, 0.2, 0.8])
    labels = np.array([0, 1, 1, 1, 1])
    auc, weight = grouped_auc(groups, scores, labels)
    assert auc.tolist() == [1.0] and weight.tolist() == [2.0]


def test_torchrec_auc_logloss_and_gauc_agree_with_exact_values() -> None:
    rng = np.random.default_rng(1)
    n, batch = 3000, 500
    logits = torch.tensor(rng.normal(size=n), dtype=torch.float32)
    labels = (torch.rand(n, generator=torch.Generator().manual_seed(1)) < torch.sigmoid(logits)).float()
    groups = torch.tensor(rng.integers(0, 50, n))
    weights = torch.ones(n)
    weights[-100:] = 0.0  # lockstep padding rows must not count
    m = EvalMetrics(["t"], batch, 1, 0, torch.device("cpu"), window_rows=n)
    for s in range(0, n, batch):
        sl = slice(s, s + batch)
        m.update({"t": logits[sl]}, {"t": labels[sl]}, weights[sl], groups[sl])
    out = m.compute()
    keep = slice(0, n - 100)
    p = torch.sigmoid(logits[keep]).numpy()
    assert out["t/auc"] == pytest.approx(brute_auc(p, labels[keep].numpy()), abs=1e-5)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[keep], labels[keep])
    assert out["t/logloss"] == pytest.approx(float(bce), abs=1e-6)
    assert out["t/gauc"] == pytest.approx(gauc(groups[keep].numpy(), p, labels[keep].numpy()))
    assert out["t/ctr"] == pytest.approx(float(labels[keep].mean()), abs=1e-6)
    assert out["t/calibration"] == pytest.approx(float(p.sum() / labels[keep].sum()), rel=1e-5)


def test_speed_ratio_interval_is_the_t_interval_of_the_log_ratios() -> None:
    """benchmarks/intervals.py: the geometric mean of per-repetition ratios, 95% Student-t on their logs."""
    from benchmarks.intervals import ratio

    assert ratio([2.0, 2.0, 2.0]) == "2.00x [2.00, 2.00]"
    assert ratio([1.5]) == "1.50x"  # one repetition: no interval
    logs = np.log([1.2, 1.5, 1.8])
    half = 4.303 * logs.std(ddof=1) / np.sqrt(3)  # t(0.975, 2 degrees of freedom)
    lo, mid, hi = np.exp(logs.mean() - half), np.exp(logs.mean()), np.exp(logs.mean() + half)
    assert ratio([1.2, 1.5, 1.8]) == f"{mid:.2f}x [{lo:.2f}, {hi:.2f}]"
