"""Plan a config for a described cluster in this process: no process group, no accelerator.

Everything the trainer's planner sees is reproduced: the TrainWrapper on `meta`, the sparse
optimizer tagged for the *planned* device type (its state changes the memory plan; Adam may be
planned for CUDA on a CPU-only machine), and `parallel/sharding.py`'s sharders, per-table
constraints, topology and planner. So a plan for the training cluster equals the plan the job
would compute collectively, and `planner.plan()` replaces `collective_plan()`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torchrec.distributed.planner.types import (
    ParameterConstraints,
    PlannerError,
    ShardingOption,
    Stats,
    StorageReservation,
    Topology,
)
from torchrec.distributed.types import ShardingPlan

from trec_rank.parallel.sharding import planner, sharders, topology
from trec_rank.runtime.model import ModelSpec, planning_model

DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class Cluster:
    """A what-if cluster. None capacities/batch size mean the config's (then torchrec's) defaults."""

    world_size: int
    local_world_size: int
    device: str
    hbm_gb: float | None = None
    ddr_gb: float | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"--world-size: must be >= 1, got {self.world_size}")
        if not 1 <= self.local_world_size <= self.world_size or self.world_size % self.local_world_size:
            raise ValueError(f"--local-world-size: {self.local_world_size} must divide the world size "
                             f"{self.world_size} (ranks per host)")
        if self.device not in DEVICES:
            raise ValueError(f"--device: '{self.device}' is not one of {', '.join(DEVICES)}")
        for name, value in (("--hbm-gb", self.hbm_gb), ("--ddr-gb", self.ddr_gb)):
            if value is not None and value < 0:
                raise ValueError(f"{name}: must be >= 0, got {value}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch-size: must be >= 1, got {self.batch_size}")

    @property
    def label(self) -> str:
        parts = [f"ws={self.world_size}", f"lws={self.local_world_size}", self.device]
        parts += [f"{k}={v:g}" for k, v in (("hbm", self.hbm_gb), ("ddr", self.ddr_gb)) if v is not None]
        return ",".join(parts + ([f"bs={self.batch_size}"] if self.batch_size else []))


class CapturePlan(Stats):
    """Keeps what the planner reports to its stats hooks, as data instead of a text box.

    On success `best_plan` is the chosen ShardingOptions (shards with rank, storage, perf); on a
    failed search it is the last proposal tried (ranks -1), and `enumerator`/`constraints` let
    the diagnosis enumerate every option again.
    """

    def __init__(self) -> None:
        self.logged = False

    def log(self, sharding_plan: ShardingPlan, topology: Topology, batch_size: int,
            storage_reservation: StorageReservation, num_proposals: int, num_plans: int, run_time: float,
            best_plan: list[ShardingOption], constraints: dict[str, ParameterConstraints] | None = None,
            sharders: list | None = None, enumerator: Any = None, debug: bool = False,
            debug_stats: Any = None) -> None:
        self.logged = True
        self.topology, self.batch_size, self.reservation = topology, batch_size, storage_reservation
        self.num_proposals, self.best_plan, self.constraints = num_proposals, best_plan, constraints or {}
        self.enumerator = enumerator


@dataclass
class PlanResult:
    cluster: Cluster
    model: nn.Module  # the tagged meta model that was planned
    topology: Topology  # capacities per rank as configured
    batch_size: int
    seconds: float
    plan: ShardingPlan | None = None  # None: the model does not fit
    options: list[ShardingOption] = field(default_factory=list)  # chosen shards (empty when not fitting)
    reserved: Topology | None = None  # per-rank capacity left for tables after dense/KJT/margin reservation
    constraints: dict[str, ParameterConstraints] = field(default_factory=dict)
    error: PlannerError | None = None
    search_space: list[ShardingOption] = field(default_factory=list)  # every allowed option (not fitting only)
    num_proposals: int = 0

    @property
    def fits(self) -> bool:
        return self.plan is not None


class _DropKnownNoise(logging.Filter):
    """torchrec warns 'Sharding spec not found' for every data-parallel table (it has no shards)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Sharding spec not found")


@contextlib.contextmanager
def _quiet_planner() -> Iterator[None]:
    """Silence the planner's known dry-run warnings; they say nothing about this plan."""
    noise, root = _DropKnownNoise(), logging.getLogger()
    # dry-run dense-size caveat; per-table 'no sharding type' (re-raised below as a ValueError)
    loggers = [logging.getLogger(f"torchrec.distributed.planner.{n}") for n in ("storage_reservations", "enumerators")]
    levels = [lg.level for lg in loggers]
    root.addFilter(noise)
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="HeuristicalStorageReservation", category=FutureWarning)
            yield
    finally:
        root.removeFilter(noise)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _no_combination(err: RuntimeError, cluster: Cluster) -> ValueError | None:
    """The enumerator's 'no sharding type and kernel left' error is a config mistake: name the table."""
    found = re.search(r"No available sharding type and compute kernel combination .* for (\S+)\. "
                      r"Module: .*, sharder: (\w+),", str(err))
    if found is None:
        return None
    table, sharder = found.groups()
    offered = next(s for s in sharders() if type(s).__name__ == sharder).sharding_types(cluster.device)
    return ValueError(f"sharding.constraints.{table}: no allowed sharding type/compute kernel exists on "
                      f"{cluster.device} ({sharder} offers {', '.join(offered)} there; caching kernels need cuda)")


def plan_cluster(spec: ModelSpec, cluster: Cluster) -> PlanResult:
    """Run the trainer's planner for `cluster`; a model that does not fit gives `plan=None`."""
    model = planning_model(spec, cluster.device)
    topo = topology(spec.inputs.sharding, cluster.world_size, cluster.local_world_size, cluster.device,
                    hbm_gb=cluster.hbm_gb, ddr_gb=cluster.ddr_gb)
    batch_size = cluster.batch_size or spec.inputs.batch_size
    capture = CapturePlan()
    result = PlanResult(cluster=cluster, model=model, topology=topo, batch_size=batch_size, seconds=0.0)
    start = time.perf_counter()
    with _quiet_planner():
        planner_ = planner(spec.inputs, topo, cluster.device, batch_size=batch_size, stats=[capture])
        try:
            result.plan = planner_.plan(model, sharders())
        except PlannerError as err:
            result.error = err
        except RuntimeError as err:
            friendly = _no_combination(err, cluster)
            if friendly is None:
                raise
            raise friendly from None
        result.seconds = time.perf_counter() - start
        if not capture.logged:  # the reservation itself failed: the dense part does not fit
            return result
        result.constraints, result.num_proposals = capture.constraints, capture.num_proposals
        result.reserved = capture.reservation.last_reserved_topology
        if result.fits:
            result.options = capture.best_plan
        else:
            result.search_space = capture.enumerator.enumerate(model, sharders())
    return result
