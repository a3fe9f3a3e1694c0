"""Small dense building blocks shared by the over-arches."""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice

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

    @property
    def first(self) -> nn.Linear:
        """The first layer, for callers that run several MLPs' first layers as one matmul."""
        layer = self.net[0]
        assert isinstance(layer, nn.Linear), "an MLP with hidden layers starts with a Linear"
        return layer

    def after_first(self, h: torch.Tensor) -> torch.Tensor:
        """forward(x) given h = first(x)."""
        for layer in islice(self.net, 1, None):
            h = layer(h)
        return h
