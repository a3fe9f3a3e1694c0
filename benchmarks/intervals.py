"""Ratios of speeds measured in repetitions, stated with their 95% interval.

The machine is shared and its speed drifts by tens of percent within minutes, so a ratio of two
single measurements says little. Every benchmark that claims "x times" runs both sides back to back
in each repetition (the same machine state) and reports the geometric mean of the per-repetition
ratios with a Student-t interval on their logarithms. The interval covers the drift within a run;
runs minutes apart can still disagree by more (measured: 1.66x [1.38, 2.01] and 2.21x [2.14, 2.28] for the
same MMoE row), so a claim rests on the largest run and names the others.
"""

from __future__ import annotations

import math
import statistics
from typing import TypeVar

T = TypeVar("T")

T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086]  # Student t, 97.5% quantile, 1..20 degrees of freedom


def rotated(systems: list[T], rep: int) -> list[T]:
    """The order to run `systems` in repetition `rep`: rotated by one each repetition, so that no system
    always runs first (or right after another's compile) and every pair sees the same machine state."""
    shift = rep % len(systems)
    return systems[shift:] + systems[:shift]


def ratio(values: list[float]) -> str:
    """Geometric mean of per-repetition ratios and its 95% t-interval, on the log scale."""
    logs = [math.log(v) for v in values]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return f"{math.exp(mean):.2f}x"
    half = T975[min(len(logs) - 2, len(T975) - 1)] * statistics.stdev(logs) / math.sqrt(len(logs))
    return f"{math.exp(mean):.2f}x [{math.exp(mean - half):.2f}, {math.exp(mean + half):.2f}]"
