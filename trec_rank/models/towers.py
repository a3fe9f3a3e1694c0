"""Multi-task towers over the shared feature encoder: shared-bottom, MoE, MMoE, CGC and PLE.

Each network maps the encoder output x [B, D] to one representation per task [B, H]; a per-task
tower MLP and a linear head then give the task's logit.
  shared-bottom: one MLP for all tasks (Caruana 1997).
  MoE:  n experts mixed by ONE softmax gate shared by all tasks (Jacobs et al. 1991).
  MMoE: n experts, one softmax gate per task (Ma et al., KDD 2018).
  CGC:  shared experts + task-specific experts; task k's gate mixes its own and the shared experts
        (Tang et al., RecSys 2020, "Customized Gate Control").
  PLE:  stacked CGC levels; every level but the last also has a shared gate over ALL experts whose
        output is the next level's shared-expert input (Progressive Layered Extraction).
Gate weights are softmax outputs (each sums to one); `forward_gates` exposes them for inspection.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from trec_rank.config.models import CGCParams, MoEParams, PLEParams, SharedBottomParams, TowerParams
from trec_rank.models.layers import MLP, StackedMLP

Gates = dict[str, torch.Tensor]  # gate name -> [B, experts it mixes]


Act = Callable[[int], nn.Module]


class Experts(nn.Module):
    """n expert MLPs on one input: x [B, D] -> [B, n, H] (every expert has at least one hidden layer).

    Stored stacked, not as n MLPs: the experts' first layers, which all read x, are one
    Linear(D, n * hidden[0]) (the same init as n Linear(D, hidden[0])), their activation one act(n *
    hidden[0]) over [B, n * hidden[0]], and any deeper layers a StackedMLP. Same function as n MLPs
    (tests/test_towers.py) with one matmul and two parameter tensors per layer instead of n of each."""

    def __init__(self, n: int, in_dim: int, hidden: list[int], dropout: float, act: Act,
                 device: torch.device | None) -> None:
        super().__init__()
        assert hidden, "config.models checks expert_hidden is non-empty"
        self.n, self.width = n, hidden[0]
        self.first = nn.Linear(in_dim, n * hidden[0], device=device)
        self.first_act = act(n * hidden[0])
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.rest = StackedMLP(n, hidden[0], hidden[1:], dropout, device, act)
        self.out_dim = self.rest.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first_act(self.first(x))  # [B, n * hidden[0]]: expert i's units at columns i * hidden[0]...
        if self.dropout is not None:
            h = self.dropout(h)
        h = h.view(x.shape[0], self.n, self.width)
        return self.rest(h.transpose(0, 1)).transpose(0, 1)  # member-major [n, B, .]; no deeper layers: h


class Gate(nn.Module):
    """softmax(W x + b): x [B, D] -> weights [B, n] over n experts."""

    def __init__(self, in_dim: int, n: int, device: torch.device | None) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, n, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.linear(x), dim=-1)


def mix(weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sums of the experts: weights [B, G, n] x experts [B, n, H] -> [B, G, H] (every gate
    at once), or weights [B, n] -> [B, H]. One bmm of B small [G, n] x [n, H] products: measured here
    2-3x faster forward + backward than the broadcast multiply-sum, which materialises [B, G, n, H] and
    its gradient (benchmarks/quality.md, issue 18)."""
    if weights.dim() == 2:
        return torch.bmm(weights.unsqueeze(1), experts).squeeze(1)
    return torch.bmm(weights, experts)


class SharedBottom(nn.Module):
    def __init__(self, in_dim: int, tasks: list[str], p: SharedBottomParams, act: Act,
                 device: torch.device | None) -> None:
        super().__init__()
        self.tasks = tasks
        self.bottom = MLP(in_dim, p.bottom, p.dropout, device, act)
        self.out_dim = self.bottom.out_dim

    def forward_gates(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], Gates]:
        h = self.bottom(x)
        return {t: h for t in self.tasks}, {}


class MixtureOfExperts(nn.Module):
    """MoE (per_task=False: one shared gate) or MMoE (per_task=True: one gate per task).

    The gates are one Linear(D, gates * n): gate g's logits are columns g * n...; one matmul for all
    of them (each keeps nn.Linear(D, n)'s init), as the experts' first layers are one (Experts)."""

    def __init__(self, in_dim: int, tasks: list[str], p: MoEParams, act: Act, device: torch.device | None,
                 per_task: bool) -> None:
        super().__init__()
        self.tasks, self.per_task = tasks, per_task
        self.experts = Experts(p.experts, in_dim, p.expert_hidden, p.dropout, act, device)
        self.gate_names = tasks if per_task else ["shared"]
        self.gates = nn.Linear(in_dim, len(self.gate_names) * p.experts, device=device)
        self.out_dim = self.experts.out_dim

    def forward_gates(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], Gates]:
        e = self.experts(x)  # [B, n, H]
        g = torch.softmax(self.gates(x).view(x.shape[0], len(self.gate_names), self.experts.n), dim=-1)
        mixed = mix(g, e).unbind(1)  # every gate's mix at once: [B, gates, n] x [B, n, H]
        gates = dict(zip(self.gate_names, g.unbind(1), strict=True))
        if self.per_task:
            return dict(zip(self.gate_names, mixed, strict=True)), gates
        return {t: mixed[0] for t in self.tasks}, gates


class CGCLevel(nn.Module):
    """One extraction level: task inputs {t: [B, D]} + shared input [B, D] -> task outputs (+ shared)."""

    def __init__(self, in_dim: int, tasks: list[str], p: CGCParams, act: Act, device: torch.device | None,
                 shared_gate: bool) -> None:
        super().__init__()
        self.tasks = tasks
        self.shared = Experts(p.shared_experts, in_dim, p.expert_hidden, p.dropout, act, device)
        self.task_experts = nn.ModuleDict(
            {t: Experts(p.task_experts, in_dim, p.expert_hidden, p.dropout, act, device) for t in tasks})
        n_own = p.task_experts + p.shared_experts
        self.task_gates = nn.ModuleDict({t: Gate(in_dim, n_own, device) for t in tasks})
        n_all = p.shared_experts + len(tasks) * p.task_experts
        self.shared_gate = Gate(in_dim, n_all, device) if shared_gate else None
        self.out_dim = self.shared.out_dim

    def forward(self, task_in: dict[str, torch.Tensor], shared_in: torch.Tensor
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, Gates]:
        shared = self.shared(shared_in)
        own = {t: self.task_experts[t](task_in[t]) for t in self.tasks}
        gates = {t: self.task_gates[t](task_in[t]) for t in self.tasks}
        out = {t: mix(gates[t], torch.cat([own[t], shared], dim=1)) for t in self.tasks}
        if self.shared_gate is None:
            return out, None, gates
        gates["shared"] = self.shared_gate(shared_in)
        everything = torch.cat([shared, *[own[t] for t in self.tasks]], dim=1)
        return out, mix(gates["shared"], everything), gates


class ProgressiveLayered(nn.Module):
    """PLE with `levels` CGC levels; CGC is the one-level case (no shared gate needed)."""

    def __init__(self, in_dim: int, tasks: list[str], p: CGCParams, act: Act, device: torch.device | None,
                 levels: int) -> None:
        super().__init__()
        self.tasks = tasks
        self.levels = nn.ModuleList()
        for i in range(levels):
            level = CGCLevel(in_dim, tasks, p, act, device, shared_gate=i < levels - 1)
            self.levels.append(level)
            in_dim = level.out_dim
        self.out_dim = in_dim

    def forward_gates(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], Gates]:
        task_in, shared_in, all_gates = {t: x for t in self.tasks}, x, {}
        for i, level in enumerate(self.levels):
            task_in, shared_in, gates = level(task_in, shared_in)
            all_gates.update({f"level{i}/{name}": g for name, g in gates.items()})
        return task_in, all_gates


TowerNetwork = SharedBottom | MixtureOfExperts | ProgressiveLayered


def build_network(kind: str, in_dim: int, tasks: list[str], p: TowerParams, act: Act,
                  device: torch.device | None) -> TowerNetwork:
    """kind: shared_bottom | moe | mmoe | cgc | ple; every network has forward_gates and out_dim.

    `p` is kind's params class (config.models.MODEL_PARAMS maps the model name to it)."""
    if kind == "shared_bottom":
        assert isinstance(p, SharedBottomParams)
        return SharedBottom(in_dim, tasks, p, act, device)
    if kind in ("moe", "mmoe"):
        assert isinstance(p, MoEParams)
        return MixtureOfExperts(in_dim, tasks, p, act, device, per_task=kind == "mmoe")
    assert kind in ("cgc", "ple"), f"unknown tower network '{kind}'"
    assert isinstance(p, CGCParams)
    levels = 1
    if kind == "ple":
        assert isinstance(p, PLEParams)
        levels = p.levels
    return ProgressiveLayered(in_dim, tasks, p, act, device, levels=levels)
