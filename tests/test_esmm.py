"""ESMM: pCTCVR = pCTR x pCVR, the entire-space loss, and the naive click-space baseline."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import ROOT
from trec_rank.config.experiment import ExperimentConfig, load_config
from trec_rank.config.typed import ConfigError, from_dict, to_dict
from trec_rank.data.batch import Batch
from trec_rank.data.dataset import ParquetDataset
from trec_rank.models.embeddings import materialize
from trec_rank.models.esmm import click_space_bce, ctcvr_logit
from trec_rank.models.ranking import AUX_LOSS, TaskLoss
from trec_rank.models.registry import build_model

CPU = torch.device("cpu")


def test_ctcvr_logit_is_the_logit_of_the_product_and_stays_finite() -> None:
    a = torch.tensor([-3.0, 0.0, 2.5, 40.0, -40.0, 90.0, -90.0, 90.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([1.0, 0.0, -0.5, 40.0, 3.0, 90.0, -90.0, -90.0], dtype=torch.float64, requires_grad=True)
    z = ctcvr_logit(a, b)
    torch.testing.assert_close(torch.sigmoid(z), torch.sigmoid(a) * torch.sigmoid(b))
    torch.testing.assert_close(F.logsigmoid(z), F.logsigmoid(a) + F.logsigmoid(b))  # also in log space
    z.sum().backward()
    assert torch.isfinite(z).all() and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    z32 = ctcvr_logit(a.detach().float(), b.detach().float())
    assert torch.isfinite(z32).all()


@pytest.fixture(scope="module")
def esmm_cfg(ml100k_dir: Path):  # noqa: ANN201
    return load_config(ROOT / "configs/ml100k_esmm.yaml", [f"data.path={ml100k_dir}/funnel"])


@pytest.fixture(scope="module")
def funnel_batch(esmm_cfg) -> Batch:  # noqa: ANN001
    ds = ParquetDataset(esmm_cfg.data.split_path("train"), esmm_cfg.schema, 64, shuffle=True, seed=1)
    batch = next(iter(ds.batches()))
    assert 0 < batch.labels["watch"].sum() < 64 and batch.labels["like"].sum() > 0
    return batch


def retyped(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` after a test edited its `model.params` mapping: validated and typed again, as loading does."""
    return from_dict(ExperimentConfig, to_dict(cfg))


def _model(cfg):  # noqa: ANN001, ANN202
    torch.manual_seed(0)
    return materialize(build_model(cfg), CPU).train()


def test_outputs_multiply_and_loss_is_bce_on_the_entire_space(esmm_cfg, funnel_batch: Batch) -> None:  # noqa: ANN001
    model = _model(esmm_cfg)
    assert not model.over.needs_batch  # plain RankingModel: the serving signature is unchanged
    out = model(funnel_batch)
    assert set(out) == {"watch", "like", "ctcvr", "cvr"}
    assert out["ctcvr"] is out["like"]  # the ctcvr task, also under its usual name for scoring (p_ctcvr)
    p_ctr, p_cvr, p_ctcvr = torch.sigmoid(out["watch"]), torch.sigmoid(out["cvr"]), torch.sigmoid(out["like"])
    torch.testing.assert_close(p_ctcvr, p_ctr * p_cvr)
    loss = TaskLoss(esmm_cfg.model.tasks, {})(out, funnel_batch.labels, funnel_batch.weights)
    y = funnel_batch.labels
    expected = F.binary_cross_entropy(p_ctr, y["watch"]) + F.binary_cross_entropy(p_ctr * p_cvr, y["like"])
    torch.testing.assert_close(loss, expected)


def test_cvr_tower_learns_from_unwatched_rows_only_in_esmm(esmm_cfg, funnel_batch: Batch) -> None:  # noqa: ANN001
    """Unwatched impressions carry CVR signal through pCTCVR in ESMM; the naive CVR tower ignores them."""
    unwatched = funnel_batch.labels["watch"] < 0.5
    weights = unwatched.float()  # only unwatched rows count

    def cvr_grad(cfg, variant_weights: dict) -> float:  # noqa: ANN001
        model = _model(cfg)
        out = model(dataclasses.replace(funnel_batch, weights=weights))
        loss = TaskLoss(cfg.model.tasks, variant_weights)(out, funnel_batch.labels, weights)
        loss.backward()
        return sum(p.grad.abs().sum().item() for p in model.over.cvr.parameters() if p.grad is not None)

    assert cvr_grad(esmm_cfg, {}) > 0
    naive = copy.deepcopy(esmm_cfg)
    naive.model.params["variant"] = "naive"
    naive.train.loss_weights = {"like": 0.0}
    naive = retyped(naive)
    assert cvr_grad(naive, {"like": 0.0}) == 0.0


def test_naive_variant_trains_cvr_on_watched_rows(esmm_cfg, funnel_batch: Batch) -> None:  # noqa: ANN001
    naive = copy.deepcopy(esmm_cfg)
    naive.model.params["variant"] = "naive"
    naive.train.loss_weights = {"like": 0.0}
    model = _model(retyped(naive))
    assert model.over.needs_batch
    out = model(funnel_batch)
    y = funnel_batch.labels
    watched = y["watch"] > 0.5
    expected = F.binary_cross_entropy_with_logits(out["cvr"][watched], y["like"][watched])
    torch.testing.assert_close(out[AUX_LOSS], expected)
    torch.testing.assert_close(torch.sigmoid(out["like"]), torch.sigmoid(out["watch"]) * torch.sigmoid(out["cvr"]))
    assert AUX_LOSS not in model.eval()(funnel_batch)
    empty = click_space_bce(out["cvr"], y["like"], torch.zeros_like(y["watch"]), funnel_batch.weights)
    assert empty.item() == 0.0


def test_config_errors(esmm_cfg) -> None:  # noqa: ANN001
    naive = copy.deepcopy(esmm_cfg)
    naive.model.params["variant"] = "naive"
    with pytest.raises(ConfigError, match=r"train\.loss_weights\.like: must be 0 for variant 'naive'"):
        build_model(retyped(naive))
    bad = copy.deepcopy(esmm_cfg)
    bad.model.params["ctr_task"] = "click"
    with pytest.raises(ConfigError, match=r"model\.params\.ctr_task: 'click' is not a task"):
        build_model(retyped(bad))
    bad = copy.deepcopy(esmm_cfg)
    bad.model.params["cvr_output"] = "watch"
    with pytest.raises(ConfigError, match=r"cvr_output: 'watch' collides"):
        build_model(retyped(bad))
