"""Explicit positive/negative feedback: the loss formula, empty histories, the feature and the switch."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import JaggedTensor

from tests.helpers import ROOT
from trec_rank.config.experiment import ExperimentConfig, load_config
from trec_rank.config.typed import ConfigError, from_dict, to_dict
from trec_rank.data.batch import Batch
from trec_rank.data.dataset import ParquetDataset
from trec_rank.models.embeddings import materialize
from trec_rank.models.feedback import (
    ExplicitFeedback,
    FeedbackParams,
    feedback_loss,
    item_feedback_term,
    similarity,
)
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


def _jt(values: torch.Tensor, lengths: list[int]) -> JaggedTensor:
    return JaggedTensor(values=values, lengths=torch.tensor(lengths))


def test_rows_without_positives_or_negatives_add_no_term() -> None:
    torch.manual_seed(0)
    params = FeedbackParams(enabled=True, history="h", positive="p", negative="n", target="t", tau=0.5, weight=2.0)
    fb = ExplicitFeedback(5, 4, params).train()
    user_in, target = torch.randn(3, 5), torch.randn(3, 4)
    pos, neg = _jt(torch.randn(3, 4), [2, 0, 1]), _jt(torch.randn(3, 4), [0, 3, 0])
    feature, aux = fb(user_in, target, pos, neg, None)
    u = fb.user_vector(user_in)
    p_mean = torch.stack([pos.values()[:2].mean(0), pos.values()[2]])
    s_p = F.cosine_similarity(u[[0, 2]], p_mean, dim=-1)
    s_n = F.cosine_similarity(u[1], neg.values().mean(0), dim=-1)
    expected = 2.0 * ((-F.logsigmoid(s_p / 0.5)).mean() + (-F.logsigmoid(-s_n / 0.5)))
    torch.testing.assert_close(aux, expected)
    torch.testing.assert_close(feature.squeeze(1), F.cosine_similarity(u, target, dim=-1))
    # a zero-weight (padding) row drops out too
    _, masked = fb(user_in, target, pos, neg, torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(masked, 2.0 * ((-F.logsigmoid(s_p[0] / 0.5)) + (-F.logsigmoid(-s_n / 0.5))))
    aux.backward()
    assert all(torch.isfinite(p.grad).all() for p in fb.parameters())
    assert fb.eval()(user_in, target, pos, neg, None)[1] is None  # training-only


def test_items_pooling_compares_u_with_every_rated_item() -> None:
    torch.manual_seed(0)
    params = FeedbackParams(enabled=True, positive="p", negative="n", target="t", user=["u"], tau=0.3,
                            weight=1.0, pooling="items", similarity="dot")
    fb = ExplicitFeedback(5, 4, params).train()
    user_in, target = torch.randn(3, 5), torch.randn(3, 4)
    pos, neg = _jt(torch.randn(3, 4), [2, 0, 1]), _jt(torch.randn(4, 4), [1, 3, 0])
    _, aux = fb(user_in, target, pos, neg, torch.tensor([1.0, 1.0, 1.0]))
    u = fb.user_vector(user_in)

    def term(row: int, x: torch.Tensor, sign: float) -> torch.Tensor:
        return (-F.logsigmoid(sign * (x @ u[row]) / 0.3)).mean()

    pv, nv = pos.values(), neg.values()
    expected = ((term(0, pv[:2], 1.0) + term(2, pv[2:], 1.0)) / 2
                + (term(0, nv[:1], -1.0) + term(1, nv[1:], -1.0)) / 2)
    torch.testing.assert_close(aux, expected)


def test_feedback_term_decreases_as_u_moves_toward_p_and_away_from_n() -> None:
    """The objective's direction: one gradient step on u alone lowers the term, and u pointing at p
    and away from n scores lower than the reverse (both poolings)."""
    torch.manual_seed(0)
    p, n = torch.randn(8, 6), torch.randn(8, 6)
    lengths, live = torch.ones(8, dtype=torch.long), torch.ones(8)
    ones = torch.ones(8)
    for pooling in ("mean", "items"):
        def loss(u: torch.Tensor, pooling: str = pooling) -> torch.Tensor:
            if pooling == "mean":
                return feedback_loss(similarity(u, p, "cosine"), ones, similarity(u, n, "cosine"), ones, 0.5)
            return (item_feedback_term(u, p, lengths, live, 1.0, "cosine", 0.5)
                    + item_feedback_term(u, n, lengths, live, -1.0, "cosine", 0.5))

        toward, away = p - n, n - p
        assert loss(toward) < loss(torch.randn(8, 6)) and loss(toward) < loss(away)
        u = torch.randn(8, 6, requires_grad=True)
        before = loss(u)
        before.backward()
        with torch.no_grad():
            stepped = u - 0.5 * u.grad
        assert loss(stepped) < before


def test_table_grad_scale_scales_only_the_aux_gradient_reaching_the_embeddings() -> None:
    torch.manual_seed(0)
    grads = {}
    for scale in (1.0, 0.25, 0.0):
        torch.manual_seed(0)
        params = FeedbackParams(enabled=True, positive="p", negative="n", target="t", user=["u"], weight=1.0,
                                pooling="items", table_grad_scale=scale)
        fb = ExplicitFeedback(5, 4, params).train()
        user_in = torch.randn(3, 5, requires_grad=True)
        target = torch.randn(3, 4, requires_grad=True)
        pv = torch.randn(3, 4, requires_grad=True)
        _, aux = fb(user_in, target, _jt(pv, [2, 0, 1]), _jt(torch.randn(2, 4), [1, 1, 0]), None)
        aux.backward()
        grads[scale] = (user_in.grad.clone(), pv.grad.clone(), fb.proj.weight.grad.clone())
        assert target.grad is None  # the aux term never reads the target
    for scale in (0.25, 0.0):
        torch.testing.assert_close(grads[scale][0], scale * grads[1.0][0])
        torch.testing.assert_close(grads[scale][1], scale * grads[1.0][1])
        torch.testing.assert_close(grads[scale][2], grads[1.0][2])  # the user tower: full gradient


def retyped(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` after a test edited its `model.params` mapping: validated and typed again, as loading does."""
    return from_dict(ExperimentConfig, to_dict(cfg))


@pytest.fixture(scope="module")
def cfg_and_batch(ml100k_dir: Path):  # noqa: ANN201
    cfg = load_config(ROOT / "configs/ml100k_din_feedback.yaml", [
        f"data.path={ml100k_dir}/ranking", "model.params.encoder.l2.weight=0.0",
        "model.params.encoder.attention.0.key_sides=[]"])
    ds = ParquetDataset(cfg.data.split_path("train"), cfg.schema, 32, shuffle=True)
    return cfg, next(iter(ds.batches()))


def test_switch_adds_feature_and_aux_loss_only_when_on(cfg_and_batch: tuple) -> None:
    cfg, batch = cfg_and_batch
    assert isinstance(batch, Batch)
    on = materialize(build_model(cfg), CPU)
    off_cfg = copy.deepcopy(cfg)
    off_cfg.model.params["encoder"]["feedback"]["enabled"] = False
    off = materialize(build_model(retyped(off_cfg)), CPU)
    assert on.over.encoder.out_dim == off.over.encoder.out_dim + 1
    assert off.over.encoder.feedback is None
    # without the term the batch is still needed, only for the parallel histories' host lengths (check_aligned)
    assert off.over.needs_batch == any(len(hists) > 1 for _, hists in off.over.encoder.groups)
    out_on, out_off = on.train()(batch), off.train()(batch)
    assert out_on[AUX_LOSS] > 0 and AUX_LOSS not in out_off
    # the feature column is s(u, target item): recompute it from the model's own embeddings
    enc = on.over.encoder
    pooled, jagged = on.ebc(batch.sparse), on.ec(batch.sequence)
    h = enc(pooled, jagged, batch.dense, batch).h
    user_in = torch.cat([enc._embed(n, pooled, jagged) for n in enc._user_inputs(enc.fb_params)], dim=1)
    u = enc.feedback.user_vector(user_in)
    assert enc.fb_params.similarity == "dot"
    torch.testing.assert_close(h[:, -1], (u * jagged["item_id"].values()).sum(-1))


def test_enabled_feedback_needs_its_features(cfg_and_batch: tuple) -> None:
    cfg, _ = cfg_and_batch
    bad = copy.deepcopy(cfg)
    bad.model.params["encoder"]["feedback"]["positive"] = "user_id"
    with pytest.raises(ConfigError, match=r"feedback\.positive: 'user_id' must be looked up"):
        build_model(retyped(bad))
    bad = copy.deepcopy(cfg)
    bad.model.params["encoder"]["feedback"]["target"] = ""
    with pytest.raises(ConfigError, match=r"feedback\.target: required"):
        build_model(retyped(bad))
