"""Subset AUCs: ESMM's `cvr/auc` scores pCVR only on the clicked rows, computed by hand here."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import ROOT
from trec_rank.config.experiment import load_config
from trec_rank.runtime.metrics import EvalMetrics, SubsetAUC, subset_aucs

CVR = SubsetAUC(output="cvr", label="like", given="watch")


def _metrics(batch: int) -> EvalMetrics:
    return EvalMetrics(["watch", "like"], batch, 1, 0, torch.device("cpu"), window_rows=16, subsets=[CVR])


def test_cvr_auc_counts_only_clicked_rows_with_weight() -> None:
    # rows:      0     1     2     3      4     5      6 (padding)
    watch = [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    like = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    cvr = [2.0, 1.0, 3.0, 10.0, 1.0, -10.0, 20.0]
    weights = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    # Clicked, weighted rows 0, 1, 2, 4: positives {0: 2.0, 4: 1.0}, negatives {1: 1.0, 2: 3.0}.
    # Pairs (0,1) win, (0,2) loss, (4,1) tie = 1/2, (4,2) loss: AUC = 1.5 / 4. Counting the unclicked
    # row 3 (score 10, label 0) would give 1.5 / 6, row 5 too 3.5 / 8, the padding row 6 more still.
    expected = 1.5 / 4
    m = _metrics(4)
    for part in (slice(0, 4), slice(4, 7)):  # two eval batches: rows accumulate across updates
        t = {name: torch.tensor(v[part]) for name, v in
             (("watch", watch), ("like", like), ("cvr", cvr), ("weights", weights))}
        logits = {"watch": torch.zeros_like(t["cvr"]), "like": torch.zeros_like(t["cvr"]), "cvr": t["cvr"]}
        m.update(logits, {"watch": t["watch"], "like": t["like"]}, t["weights"], None)
    out = m.compute()
    assert out["cvr/auc"] == pytest.approx(expected, abs=1e-12)
    assert "cvr/logloss" not in out and {"watch/auc", "like/auc"} <= set(out)


def test_cvr_auc_is_nan_without_both_classes_on_clicked_rows() -> None:
    m = _metrics(3)
    logits = {"watch": torch.zeros(3), "like": torch.zeros(3), "cvr": torch.tensor([0.5, -0.5, 2.0])}
    # the only positive is unclicked: clicked rows hold a single class
    m.update(logits, {"watch": torch.tensor([1.0, 1.0, 0.0]), "like": torch.tensor([0.0, 0.0, 1.0])},
             torch.ones(3), None)
    assert math.isnan(m.compute()["cvr/auc"])


def test_esmm_configs_declare_cvr_on_clicks_and_towers_declare_none() -> None:
    funnel = load_config(ROOT / "configs/ml100k_esmm.yaml")
    assert subset_aucs(funnel) == [SubsetAUC("cvr", "like", "watch")]
    renamed = load_config(ROOT / "configs/ml100k_esmm.yaml", ["model.params.cvr_output=p_cvr"])
    assert subset_aucs(renamed) == [SubsetAUC("p_cvr", "like", "watch")]
    assert subset_aucs(load_config(ROOT / "configs/adult_mmoe.yaml")) == []
