"""Small dense building blocks shared by the over-arches."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


class MLP(nn.Module):
    """Linear -> activation -> dropout per hidden width; `act(width)` builds each activation
    (ReLU by default; Dice needs the width for its per-unit statistics)."""

    def __init__(self, in_dim: int, hidden: list[int], dropout: float = 0.0, device: torch.device | None = None,
                 act: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width, device=device), act(width) if act else nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_dim = width
        self.net = nn.Sequential(*layers)
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class StackedLinear(nn.Module):
    """n independent Linear(in_dim, out_dim) layers as one: x [n, B, in_dim] -> [n, B, out_dim], member i
    applied to x[i] (dense, no padding).

    One baddbmm and two parameter tensors instead of n addmms and 2n tensors: at batch 256 a multi-task
    step is dominated by per-op and per-tensor work (autograd nodes, gradient accumulation, the optimizer
    loop), not by arithmetic. weight [n, in_dim, out_dim] is stored transposed, as baddbmm reads it; each
    member is initialised as nn.Linear initialises itself (weight and bias uniform in +-1/sqrt(in_dim))."""

    def __init__(self, n: int, in_dim: int, out_dim: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.n, self.in_dim, self.out_dim = n, in_dim, out_dim
        self.weight = nn.Parameter(torch.empty(n, in_dim, out_dim, device=device))
        self.bias = nn.Parameter(torch.empty(n, 1, out_dim, device=device))
        if not self.weight.is_meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_dim)  # nn.Linear's kaiming_uniform(a=sqrt(5)) bound, and its bias'
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            self.bias.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


def stacked_activation(act: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """act(n * width) applied to n stacked members h [n, B, width].

    ReLU is elementwise, so it runs on h as is. Dice and PReLU keep parameters (and Dice statistics) per
    unit over the batch, so one module over the n * width columns of [B, n * width] is exactly n
    independent ones over their own width."""
    if isinstance(act, nn.ReLU):
        return act(h)
    n, b, width = h.shape
    return act(h.transpose(0, 1).reshape(b, n * width)).view(b, n, width).transpose(0, 1)


class StackedMLP(nn.Module):
    """n MLPs of the same widths, member i on its own input: x [n, B, in_dim] -> [n, B, out_dim].

    The same function as n `MLP`s (tests/test_towers.py), stored as one StackedLinear per layer; used
    for the per-task towers and for the experts' layers after their shared first one. No hidden
    layers: the identity."""

    def __init__(self, n: int, in_dim: int, hidden: list[int], dropout: float = 0.0,
                 device: torch.device | None = None, act: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        self.layers, self.acts = nn.ModuleList(), nn.ModuleList()
        for width in hidden:
            self.layers.append(StackedLinear(n, in_dim, width, device))
            self.acts.append(act(n * width) if act else nn.ReLU())
            in_dim = width
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, act in zip(self.layers, self.acts, strict=True):
            x = stacked_activation(act, layer(x))
            if self.dropout is not None:
                x = self.dropout(x)
        return x
