"""Explicit positive/negative feedback: the loss formula, empty histories, the feature and the switch."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import ROOT
from trec_rank.config.experiment import load_config
from trec_rank.config.typed import ConfigError
from trec_rank.data.batch import Batch
from trec_rank.data.dataset import ParquetDataset
from trec_rank.models.embeddings import materialize
from trec_rank.models.feedback import ExplicitFeedback, FeedbackParams, feedback_loss, similarity
from trec_rank.models.ranking import AUX_LOSS
from trec_rank.models.registry import build_model

CPU = torch.device("cpu")


def test_feedback_loss_matches_the_formula_row_by_row() -> None:
    torch.manual_seed(0)
    s_pos, s_neg = torch.randn(6), torch.randn(6)
    has_pos = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    has_neg = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    tau = 0.3
    pos_terms = [-math.log(1 / (1 + math.exp(-s / tau))) for s, h in zip(s_pos.tolist(), has_pos) if h]
    neg_terms = [-math.log(1 / (1 + math.exp(s / tau))) for s, h in zip(s_neg.tolist(), has_neg) if h]
    expected = sum(pos_terms) / len(pos_terms) + sum(neg_terms) / len(neg_terms)
    assert feedback_loss(s_pos, has_pos, s_neg, has_neg, tau).item() == pytest.approx(expected, rel=1e-6)
    assert feedback_loss(s_pos, torch.zeros(6), s_neg, torch.zeros(6), tau).item() == 0.0


def test_similarity_cosine_and_dot() -> None:
    u = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    x = torch.tensor([[6.0, 8.0], [0.0, 0.0]])
    torch.testing.assert_close(similarity(u, x, "cosine"), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(similarity(u, x, "dot"), torch.tensor([50.0, 0.0]))


def test_rows_without_positives_or_negatives_add_no_term() -> None:
    torch.manual_seed(0)
    params = FeedbackParams(enabled=True, history="h", positive="p", negative="n", target="t", tau=0.5, weight=2.0)
    fb = ExplicitFeedback(5, 4, params).train()
    user_in, target = torch.randn(3, 5), torch.randn(3, 4)
    pos, neg = torch.randn(3, 4), torch.randn(3, 4)
    pos_len, neg_len = torch.tensor([2, 0, 1]), torch.tensor([0, 3, 0])
    feature, aux = fb(user_in, target, pos, pos_len, neg, neg_len, None)
    u = fb.user_vector(user_in)
    s_p, s_n = F.cosine_similarity(u, pos, dim=-1), F.cosine_similarity(u, neg, dim=-1)
    expected = 2.0 * ((-F.logsigmoid(s_p[[0, 2]] / 0.5)).mean() + (-F.logsigmoid(-s_n[1] / 0.5)))
    torch.testing.assert_close(aux, expected)
    torch.testing.assert_close(feature.squeeze(1), F.cosine_similarity(u, target, dim=-1))
    # what an empty row pools to does not matter; a zero-weight (padding) row drops out too
    pos2 = pos.clone()
    pos2[1] = 0.0
    torch.testing.assert_close(fb(user_in, target, pos2, pos_len, neg, neg_len, None)[1], aux)
    _, masked = fb(user_in, target, pos, pos_len, neg, neg_len, torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(masked, 2.0 * ((-F.logsigmoid(s_p[0] / 0.5)) + (-F.logsigmoid(-s_n[1] / 0.5))))
    aux.backward()
    assert all(torch.isfinite(p.grad).all() for p in fb.parameters())
    assert fb.eval()(user_in, target, pos, pos_len, neg, neg_len, None)[1] is None  # training-only


@pytest.fixture(scope="module")
def cfg_and_batch(ml100k_dir: Path):  # noqa: ANN201
    cfg = load_config(ROOT / "configs/ml100k_din.yaml", [f"data.path={ml100k_dir}/ranking",
                                                         "model.params.encoder.l2.weight=0.0"])
    ds = ParquetDataset(cfg.data.split_path("train"), cfg.schema, 32, shuffle=True)
    return cfg, next(iter(ds.batches()))


def test_switch_adds_feature_and_aux_loss_only_when_on(cfg_and_batch: tuple) -> None:
    cfg, batch = cfg_and_batch
    assert isinstance(batch, Batch)
    on = materialize(build_model(cfg), CPU)
    off_cfg = copy.deepcopy(cfg)
    off_cfg.model.params["encoder"]["feedback"]["enabled"] = False
    off = materialize(build_model(off_cfg), CPU)
    assert on.over.encoder.out_dim == off.over.encoder.out_dim + 1
    assert off.over.encoder.feedback is None and not off.over.needs_batch
    out_on, out_off = on.train()(batch), off.train()(batch)
    assert out_on[AUX_LOSS] > 0 and AUX_LOSS not in out_off
    # the feature column is s(u, target item): recompute it from the model's own embeddings
    enc = on.over.encoder
    pooled, jagged = on.ebc(batch.sparse), on.ec(batch.sequence)
    h = enc(pooled, jagged, batch.dense, batch).h
    user_in = torch.cat([enc._embed(n, pooled, jagged) for n in [*enc.fb_params.user, "hist_item_id"]], dim=1)
    u = enc.feedback.user_vector(user_in)
    torch.testing.assert_close(h[:, -1], F.cosine_similarity(u, jagged["item_id"].values(), dim=-1))


def test_enabled_feedback_needs_its_features(cfg_and_batch: tuple) -> None:
    cfg, _ = cfg_and_batch
    bad = copy.deepcopy(cfg)
    bad.model.params["encoder"]["feedback"]["positive"] = "user_id"
    with pytest.raises(ConfigError, match=r"feedback\.positive: 'user_id' must be looked up"):
        build_model(bad)
    bad = copy.deepcopy(cfg)
    bad.model.params["encoder"]["feedback"]["target"] = ""
    with pytest.raises(ConfigError, match=r"feedback\.target: required"):
        build_model(bad)
