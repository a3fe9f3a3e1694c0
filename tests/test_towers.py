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
from trec_rank.models.dice import make_activation
from trec_rank.models.embeddings import materialize, pooled_values
from trec_rank.models.layers import MLP, StackedLinear, StackedMLP
from trec_rank.models.ranking import AUX_LOSS, TaskLoss
from trec_rank.models.registry import build_model
from trec_rank.models.towers import build_network
from trec_rank.runtime.model import fingerprint, ranking_spec

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


def _members(stacked: StackedMLP, act: str) -> list[MLP]:
    """The n MLPs a StackedMLP stands for, with its weights copied member by member."""
    members = []
    for i in range(stacked.layers[0].n):
        widths = [layer.out_dim for layer in stacked.layers]
        mlp = MLP(stacked.layers[0].in_dim, widths, act=make_activation(act))
        linears = [m for m in mlp.net if isinstance(m, torch.nn.Linear)]
        acts = [m for m in mlp.net if not isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            for lin, layer, a, stacked_act in zip(linears, stacked.layers, acts, stacked.acts, strict=True):
                lin.weight.copy_(layer.weight[i].t())
                lin.bias.copy_(layer.bias[i, 0])
                for name, value in stacked_act.named_parameters():
                    w = value.numel() // layer.n
                    getattr(a, name).copy_(value[i * w:(i + 1) * w])
        members.append(mlp)
    return members


@pytest.mark.parametrize("act", ["relu", "prelu", "dice"])
def test_stacked_mlp_is_n_mlps_with_the_same_weights(act: str) -> None:
    """Member i of a StackedMLP on x[i] equals an MLP holding member i's weights on x[i], forward and
    backward; per-unit activations (Dice's batch statistics, PReLU's slopes) stay per member."""
    torch.manual_seed(0)
    stacked = StackedMLP(3, 6, [8, 4], act=make_activation(act))
    with torch.no_grad():  # Dice and PReLU start as (near) ReLU: give every unit its own slope
        for a in stacked.acts:
            for value in a.parameters():
                value.uniform_(-0.5, 0.5)
    members = _members(stacked, act)
    x = torch.randn(3, 7, 6, requires_grad=True)
    got = stacked(x)
    want = torch.stack([m(x[i]) for i, m in enumerate(members)])
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got.square().sum(), [x, stacked.layers[0].weight])
    g_want = torch.autograd.grad(want.square().sum(), [x, *[m.net[0].weight for m in members]])
    torch.testing.assert_close(g_got[0], g_want[0])
    torch.testing.assert_close(g_got[1], torch.stack([g.t() for g in g_want[1:]]))


def test_stacked_linear_members_start_as_nn_linear_does() -> None:
    """Each member's weight and bias are uniform in +-1/sqrt(in_dim), nn.Linear's own init."""
    torch.manual_seed(0)
    layer, bound = StackedLinear(4, 100, 300), 1 / 100 ** 0.5
    for value in (layer.weight, layer.bias):
        assert value.abs().max() <= bound and value.abs().max() > 0.99 * bound
        assert abs(value.mean().item()) < 0.02 * bound
        torch.testing.assert_close(value.std(), torch.tensor(bound / 3 ** 0.5), rtol=0.03, atol=0.0)


@pytest.mark.parametrize("kind", ["moe", "mmoe"])
def test_stacked_experts_and_gates_are_the_separate_modules(kind: str) -> None:
    """MoE's experts (first layer one Linear over all of them, deeper ones stacked) and its gates (one
    Linear over all gates) compute what n expert MLPs and one softmax(Linear) per gate compute, with
    the same weights; outputs and gradients agree."""
    net = _net(kind, MoEParams(experts=3, expert_hidden=[8, 4], dropout=0.0))
    x = torch.randn(7, 6, requires_grad=True)
    out, gates = net.forward_gates(x)
    first = net.experts.first
    experts = []
    for i, rest in enumerate(_members(net.experts.rest, "relu")):
        w, b = first.weight[i * 8:(i + 1) * 8], first.bias[i * 8:(i + 1) * 8]
        experts.append(rest(torch.relu(x @ w.t() + b)))
    e = torch.stack(experts, dim=1)  # [B, 3, 4]
    names = TASKS if kind == "mmoe" else ["shared"]
    want_gates = {g: torch.softmax(x @ net.gates.weight[i * 3:(i + 1) * 3].t() + net.gates.bias[i * 3:(i + 1) * 3],
                                   -1) for i, g in enumerate(names)}
    want = {t: (want_gates[t if kind == "mmoe" else "shared"].unsqueeze(-1) * e).sum(1) for t in TASKS}
    for name in names:
        torch.testing.assert_close(gates[name], want_gates[name])
    loss = sum((i + 1) * out[t].square().sum() for i, t in enumerate(TASKS))
    want_loss = sum((i + 1) * want[t].square().sum() for i, t in enumerate(TASKS))
    for t in TASKS:
        torch.testing.assert_close(out[t], want[t])
    torch.testing.assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(want_loss, x)[0])


def test_task_towers_and_heads_are_one_mlp_and_head_per_task(adult_dir: Path, adult_batch) -> None:  # noqa: ANN001
    """The over-arch's stacked towers: task t's logit is head_t(tower_t(network output for t))."""
    cfg = load_config(ROOT / "configs/adult_mmoe.yaml", [f"data.path={adult_dir}/adult"])
    model = materialize(build_model(cfg), torch.device("cpu"))
    over, pooled, jagged = model.over, model.ebc(adult_batch.sparse), None  # adult: no sequence features
    out, _ = over.forward_gates(pooled, jagged, adult_batch.dense)
    per_task, _ = over.net.forward_gates(over.encoder(pooled, jagged, adult_batch.dense).h)
    for i, (task, tower) in enumerate(zip(cfg.model.tasks, _members(over.towers, "relu"), strict=True)):
        head = over.heads
        torch.testing.assert_close(out[task], (tower(per_task[task]) @ head.weight[i] + head.bias[i, 0]).squeeze(-1))


def test_tower_models_fingerprint_their_parameter_layout(adult_dir: Path) -> None:
    """A checkpoint written before the towers were stacked carries the old fingerprint and is refused by
    checkpoint.check; models whose layout never changed keep the fingerprint they had."""
    mmoe = load_config(ROOT / "configs/adult_mmoe.yaml", [f"data.path={adult_dir}/adult"])
    old = fingerprint({"schema": to_dict(mmoe.schema), "model": to_dict(mmoe.model)})
    assert ranking_spec(mmoe).fingerprint != old
    din = load_config(ROOT / "configs/ml100k_din.yaml")
    assert ranking_spec(din).fingerprint == fingerprint({"schema": to_dict(din.schema), "model": to_dict(din.model)})


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
