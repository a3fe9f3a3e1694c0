"""Dice, DIN's data-adaptive activation (Zhou et al., KDD 2018, eq. 6), and the activation factory.

PReLU switches between its two slopes at 0 for every input; Dice moves the switch point to where
each unit's inputs actually are: p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps)) and
f(s) = p(s) * s + (1 - p(s)) * alpha * s. E and Var are per-unit statistics of the mini-batch in
training and running averages in eval, exactly as BatchNorm keeps them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

Activation = Literal["dice", "prelu", "relu"]


class Dice(nn.Module):
    """Dice over the last dimension of x [..., width]; statistics pool every leading position.

    Input may be [B, width] (top MLP) or [N, width] over jagged behaviours (attention unit):
    one statistic per unit, never per sample.
    """

    def __init__(self, width: int, eps: float = 1e-8, momentum: float = 0.1,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.width, self.eps, self.momentum = width, eps, momentum
        self.alpha = nn.Parameter(torch.empty(width, device=device))
        self.register_buffer("running_mean", torch.empty(width, device=device))
        self.register_buffer("running_var", torch.empty(width, device=device))
        if not self.alpha.is_meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """alpha 0 (the paper's start: ReLU-like), running mean 0 / variance 1 (identity normalisation).

        DMP zero-fills meta buffers before calling this, so the running variance must be set here."""
        with torch.no_grad():
            self.alpha.zero_()
            self.running_mean.zero_()
            self.running_var.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.width)
        n = flat.shape[0]
        if self.training and n > 0:
            mean = flat.mean(dim=0)
            var = flat.var(dim=0, unbiased=False)
            with torch.no_grad():  # BatchNorm's convention: biased var normalises, unbiased is tracked
                self.running_mean.lerp_(mean.detach(), self.momentum)
                if n > 1:
                    self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        else:  # eval, or an empty training batch (no behaviours at all): running statistics
            mean, var = self.running_mean, self.running_var
        p = torch.sigmoid((x - mean) / torch.sqrt(var + self.eps))
        return p * x + (1.0 - p) * self.alpha * x


def make_activation(name: Activation, device: torch.device | None = None) -> Callable[[int], nn.Module]:
    """`act(width)` factory for `layers.MLP`; modules are created on the model's device (meta)."""
    if name == "dice":
        return lambda width: Dice(width, device=device)
    if name == "prelu":
        return lambda width: nn.PReLU(width, device=device)
    if name == "relu":
        return lambda width: nn.ReLU()
    raise ValueError(f"unknown activation '{name}' (dice, prelu, relu)")
