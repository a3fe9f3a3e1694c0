"""Dice, DIN's data-adaptive activation (Zhou et al., KDD 2018, eq. 6), and the activation factory.

PReLU switches between its two slopes at 0 for every input; Dice moves the switch point to where
each unit's inputs actually are: p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps)) and
f(s) = p(s) * s + (1 - p(s)) * alpha * s. E and Var are per-unit statistics of the mini-batch in
training and running averages in eval, exactly as BatchNorm keeps them.

Training runs through `_DiceFunction`, a hand-written backward: autograd over the ~10 elementwise
ops (and the very slow column `var` on CPU) made Dice over DIN's [N behaviours, 64] activations the
largest cost of a training step. The gradient still flows through the batch mean and variance, as
in BatchNorm; tests/test_speed_equivalence.py checks it against autograd over the plain formula.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from trec_rank.config.encoder import Activation


class _DiceFunction(torch.autograd.Function):
    """x [n, w] (n >= 1), alpha [w], eps -> (f(x) [n, w], batch mean [w], biased batch var [w]).

    With z = (x - m) / sqrt(v + eps), p = sigmoid(z) and g = alpha + (1 - alpha) p, f(x) = x g
    (= p x + (1 - p) alpha x). Backward: dL/dz = dy x (1 - alpha) p (1 - p), pushed through the
    normalisation with BatchNorm's formula dx = s (u - mean(u) - z mean(u z)), s = 1/sqrt(v + eps).
    The mean/var outputs are statistics for the running buffers only (no gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor, eps: float  # noqa: ANN001
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean = x.mean(dim=0)
        xc = x - mean
        var = (xc * xc).mean(dim=0)  # column var() is ~10x slower on CPU than this
        s = torch.rsqrt(var + eps)
        z = xc.mul_(s)
        p = torch.sigmoid(z)
        g = torch.addcmul(alpha, p, 1.0 - alpha)
        ctx.save_for_backward(x, alpha, z, p, g, s)
        ctx.mark_non_differentiable(mean, var)
        return x * g, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor, _dm: torch.Tensor, _dv: torch.Tensor  # noqa: ANN001
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, alpha, z, p, g, s = ctx.saved_tensors
        n = x.shape[0]
        dyx = dy * x
        t = dyx * p
        dalpha = dyx.sum(dim=0) - t.sum(dim=0) if ctx.needs_input_grad[1] else None  # sum dy x (1 - p)
        u = torch.addcmul(t, t, p, value=-1.0)  # dy x p (1 - p); dL/dz is this times (1 - alpha)
        # centre before scaling by s (up to 1/sqrt(eps) for a constant unit): no cancellation
        dx = (u - u.sum(dim=0) / n).addcmul_(z, (u * z).sum(dim=0) / -n).mul_(s * (1.0 - alpha))
        return dx.addcmul_(dy, g), dalpha, None


class Dice(nn.Module):
    """Dice over the last dimension of x [..., width]; statistics pool every leading position.

    Input may be [B, width] (top MLP) or [N, width] over jagged behaviours (attention unit):
    one statistic per unit, never per sample.
    """

    running_mean: torch.Tensor  # [width] buffer
    running_var: torch.Tensor  # [width] buffer

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
            out, mean, var = _DiceFunction.apply(flat, self.alpha, self.eps)
            with torch.no_grad():  # BatchNorm's convention: biased var normalises, unbiased is tracked
                self.running_mean.lerp_(mean, self.momentum)
                if n > 1:
                    self.running_var.lerp_(var * n / (n - 1), self.momentum)
            return out.reshape(x.shape)
        # eval, or an empty training batch (no behaviours at all): running statistics, z = x s - mean s
        s = torch.rsqrt(self.running_var + self.eps)
        p = torch.addcmul(-self.running_mean * s, x, s).sigmoid_()
        if torch.is_grad_enabled():  # autograd keeps p for sigmoid's backward: no further in-place ops
            return x * torch.addcmul(self.alpha, p, 1.0 - self.alpha)
        # scoring and eval: one [..., width] buffer instead of five (allocating and faulting in pages for
        # each large temporary was most of the cost: ~4x faster over DIN's [N behaviours, 64])
        return p.mul_(1.0 - self.alpha).add_(self.alpha).mul_(x)


def make_activation(name: Activation, device: torch.device | None = None) -> Callable[[int], nn.Module]:
    """`act(width)` factory for `layers.MLP`; modules are created on the model's device (meta)."""
    if name == "dice":
        return lambda width: Dice(width, device=device)
    if name == "prelu":
        return lambda width: nn.PReLU(width, device=device)
    if name == "relu":
        return lambda width: nn.ReLU()
    raise ValueError(f"unknown activation '{name}' (dice, prelu, relu)")
