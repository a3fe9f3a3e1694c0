"""Small dense building blocks shared by the over-arches."""

from __future__ import annotations

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
