"""Multi-task towers: gates are distributions over the right experts; every variant builds and runs; the
multi-task loss and the pooled inputs every tower reads."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import KeyedTensor

from tests.helpers import ROOT
from trec_rank.config.experiment import ExperimentConfig, load_config
from trec_rank.config.models import CGCParams, MoEParams, PLEParams, SharedBottomParams, parse_params
from trec_rank.config.typed import ConfigError, from_dict, to_dict
from trec_rank.data.dataset import ParquetDataset
from trec_rank.models.embeddings import materialize, pooled_values
from trec_rank.models.ranking import AUX_LOSS, TaskLoss
from trec_rank.models.registry import build_model
from trec_rank.models.towers import build_network

TASKS = ["a", "b", "c"]


def _net(kind: str, params) -> torch.nn.Module:  # noqa: ANN001
    torch.manual_seed(0)
    return build_network(kind, 6, TASKS, params, lambda width: torch.nn.ReLU(), None)


def _gates(kind: str, params) -> tuple[dict, dict]:  # noqa: ANN001
    return _net(kind, params).forward_gates(torch.randn(5, 6) * 3)


def _assert_distributions(gates: dict) -> None:
    for name, g in gates.items():
        assert torch.all(g >= 0), name
        torch.testing.assert_close(g.sum(-1), torch.ones(g.shape[0]), msg=name)


def test_moe_has_one_shared_gate_and_identical_task_inputs() -> None:
    out, gates = _gates("moe", MoEParams(experts=5, expert_hidden=[8]))
    assert {k: v.shape for k, v in gates.items()} == {"shared": (5, 5)}
    _assert_distributions(gates)
    assert torch.equal(out["a"], out["b"]) and out["a"].shape == (5, 8)


def test_mmoe_has_one_gate_per_task_over_all_experts() -> None:
    net = _net("mmoe", MoEParams(experts=4, expert_hidden=[8]))
    x = torch.randn(5, 6)
    out, gates = net.forward_gates(x)
    assert {k: v.shape for k, v in gates.items()} == {t: (5, 4) for t in TASKS}
    _assert_distributions(gates)
    assert not torch.equal(out["a"], out["b"])
    experts = net.experts(x)  # [B, 4, 8]; task output = gate-weighted sum of the expert outputs
    torch.testing.assert_close(out["c"], (gates["c"].unsqueeze(-1) * experts).sum(1))


@pytest.mark.parametrize("kind", ["moe", "mmoe"])
def test_experts_and_gates_as_one_matmul_equal_each_module_on_its_own(kind: str) -> None:
    """forward_gates runs the experts' first layers and the gates as one addmm; the same function
    computed module by module (expert MLPs, softmax(gate(x)), the weighted sum of the experts) gives the
    same outputs and gradients."""
    net = _net(kind, MoEParams(experts=3, expert_hidden=[8, 4], dropout=0.0))
    x = torch.randn(7, 6, requires_grad=True)
    out, gates = net.forward_gates(x)
    experts = net.experts(x)
    want_gates = {name: torch.softmax(gate.linear(x), -1) for name, gate in net.gates.items()}
    want = {t: (want_gates[t if kind == "mmoe" else "shared"].unsqueeze(-1) * experts).sum(1) for t in TASKS}
    for name in want_gates:
        torch.testing.assert_close(gates[name], want_gates[name])
    params = [x, *net.parameters()]
    got_grads = torch.autograd.grad(sum((i + 1) * out[t].square().sum() for i, t in enumerate(TASKS)), params)
    want_grads = torch.autograd.grad(sum((i + 1) * want[t].square().sum() for i, t in enumerate(TASKS)), params)
    for t in TASKS:
        torch.testing.assert_close(out[t], want[t])
    for got, expected in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected)


def test_cgc_task_gates_mix_own_and_shared_experts() -> None:
    net = _net("cgc", CGCParams(shared_experts=2, task_experts=3, expert_hidden=[8]))
    x = torch.randn(5, 6)
    out, gates = net.forward_gates(x)
    assert {k: v.shape for k, v in gates.items()} == {f"level0/{t}": (5, 3 + 2) for t in TASKS}
    _assert_distributions(gates)
    level = net.levels[0]
    own, shared = level.task_experts["b"](x), level.shared(x)
    torch.testing.assert_close(out["b"], (gates["level0/b"].unsqueeze(-1) * torch.cat([own, shared], 1)).sum(1))


def test_ple_inner_levels_have_a_shared_gate_over_all_experts() -> None:
    net = _net("ple", PLEParams(shared_experts=2, task_experts=1, levels=3, expert_hidden=[8]))
    x = torch.randn(5, 6)
    out, gates = net.forward_gates(x)
    n_all = 2 + len(TASKS) * 1
    expected = {f"level{i}/{t}": (5, 1 + 2) for i in range(3) for t in TASKS}
    expected.update({"level0/shared": (5, n_all), "level1/shared": (5, n_all)})  # not on the last level
    assert {k: v.shape for k, v in gates.items()} == expected
    _assert_distributions(gates)
    # level 1's shared experts read level 0's shared-gate mixture of ALL level-0 experts
    l0, l1 = net.levels[0], net.levels[1]
    everything = torch.cat([l0.shared(x), *[l0.task_experts[t](x) for t in TASKS]], dim=1)
    shared_in = (gates["level0/shared"].unsqueeze(-1) * everything).sum(1)
    torch.testing.assert_close(l1.shared_gate(shared_in), gates["level1/shared"])
    assert set(out) == set(TASKS)


def test_shared_bottom_gives_every_task_the_same_representation() -> None:
    out, gates = _gates("shared_bottom", SharedBottomParams(bottom=[16, 8]))
    assert gates == {} and torch.equal(out["a"], out["c"]) and out["a"].shape == (5, 8)


@pytest.fixture(scope="module")
def adult_batch(adult_dir: Path):  # noqa: ANN201
    cfg = load_config(ROOT / "configs/adult_ple.yaml", [f"data.path={adult_dir}/adult"])
    return next(iter(ParquetDataset(cfg.data.split_path("train"), cfg.schema, 16).batches()))


@pytest.mark.parametrize("config,name", [("adult_shared_bottom", "shared_bottom"), ("adult_moe", "moe"),
                                         ("adult_mmoe", "mmoe"), ("adult_cgc", "cgc"), ("adult_ple", "ple")])
def test_every_tower_model_builds_on_meta_and_scores_both_tasks(config: str, name: str, adult_dir: Path,
                                                                 adult_batch) -> None:  # noqa: ANN001
    cfg = load_config(ROOT / f"configs/{config}.yaml", [f"data.path={adult_dir}/adult", f"model.name={name}"])
    model = build_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    out = materialize(model, torch.device("cpu"))(adult_batch)
    assert set(out) == {"income", "never_married"} and out["income"].shape == (16,)
    assert torch.isfinite(out["never_married"]).all()


def test_tower_params_reject_keys_of_other_variants() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'model.params.levels'"):
        parse_params("mmoe", {"levels": 2})
    with pytest.raises(ConfigError, match="shared_experts >= 1"):
        parse_params("cgc", {"shared_experts": 0})


def test_towers_run_over_the_din_encoder(ml100k_dir: Path) -> None:
    """Any encoder: an MMoE over DIN attention features (one task here, the gate still sums to one)."""
    cfg = load_config(ROOT / "configs/ml100k_din.yaml", [f"data.path={ml100k_dir}/ranking"])
    cfg = copy.deepcopy(cfg)
    cfg.model.name = "mmoe"
    cfg.model.params = {"encoder": cfg.model.params["encoder"], "experts": 3, "expert_hidden": [16]}
    model = materialize(build_model(from_dict(ExperimentConfig, to_dict(cfg))), torch.device("cpu")).eval()
    batch = next(iter(ParquetDataset(cfg.data.split_path("valid"), cfg.schema, 8).batches()))
    out, gates = model.over.forward_gates(model.ebc(batch.sparse), model.ec(batch.sequence), batch.dense, batch)
    assert out["like"].shape == (8,) and gates["like"].shape == (8, 3)
    assert len(model.over.encoder.attention) == 1


def test_task_loss_is_the_weighted_sum_of_each_tasks_weighted_mean_bce() -> None:
    """The loss stacks the tasks into one BCE; the equation is per task: sum_t w_t * sum_b m_b bce_tb / sum_b m_b,
    with padding rows (m_b = 0) adding nothing and the auxiliary term added once."""
    torch.manual_seed(0)
    logits = {t: torch.randn(7, requires_grad=True) for t in TASKS}
    labels = {t: torch.randint(0, 2, (7,)).float() for t in TASKS}
    mask = torch.tensor([1.0, 1, 0, 1, 1, 0, 1])
    task_w = {"a": 1.0, "b": 0.25, "c": 3.0}
    for weights in ({}, task_w):
        loss = TaskLoss(TASKS, weights)({**logits, AUX_LOSS: torch.tensor(0.5)}, labels, mask)
        expected = 0.5 + sum(weights.get(t, 1.0) * sum(
            float(mask[b]) * F.binary_cross_entropy_with_logits(logits[t][b], labels[t][b]) for b in range(7))
            / mask.sum() for t in TASKS)
        torch.testing.assert_close(loss, expected)
        grads = torch.autograd.grad(loss, [logits[t] for t in TASKS])
        for t, g in zip(TASKS, grads, strict=True):  # d/dx bce = sigmoid(x) - y, scaled by w_t m_b / sum m
            want = weights.get(t, 1.0) * mask * (torch.sigmoid(logits[t]) - labels[t]) / mask.sum()
            torch.testing.assert_close(g, want.detach())


def test_pooled_values_follow_the_schema_order_whatever_the_key_order() -> None:
    """In the schema's order the EBC output is used as is (no split and concat); in another order
    (several sharding types) its columns are reordered to the schema's, so the plan never moves them."""
    a, b, c = torch.randn(4, 2), torch.randn(4, 3), torch.randn(4, 1)
    same = KeyedTensor.from_tensor_list(["a", "b", "c"], [a, b, c])
    assert pooled_values(same, ["a", "b", "c"]) is same.values()
    other = KeyedTensor.from_tensor_list(["c", "a", "b"], [c, a, b])
    torch.testing.assert_close(pooled_values(other, ["a", "b", "c"]), torch.cat([a, b, c], dim=1))
