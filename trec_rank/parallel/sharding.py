"""From a model on `meta` to a sharded DistributedModelParallel: optimizer tagging, planner, DMP.

Training and `trec-rank plan` call the same functions, so an offline plan sees exactly the
sharders, per-table constraints, topology and optimizer state that the trainer will use (the
optimizer changes the memory plan: Adam keeps ~3x the state of row-wise Adagrad).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torchrec.optim as trec_optim
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import (
    HardwareConfig,
    KernelConfig,
    ShardingOption,
    Topology,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan

from trec_rank.config.experiment import OptimConfig, ShardingConfig, ShardingType
from trec_rank.config.schema import Schema
from trec_rank.parallel.env import device_total_bytes, planner_hbm_gib

GIB = 1024**3
# fbgemm's CPU TBE implements only these in-backward optimizers.
CPU_SPARSE_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")
# Sharding types in order of preference when the planner's costs tie (simplest layout first).
DEFAULT_ORDER: tuple[ShardingType, ...] = (
    "data_parallel", "table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise")


@dataclass(frozen=True)
class ShardingInputs:
    """What planning and sharding read from a job's config, whatever its kind: the tables and the
    features reading them (pooling factors, sequence vs pooled), per-table constraints and
    capacities, and the per-rank batch size the planner sizes buffers and communication for."""

    schema: Schema
    sharding: ShardingConfig
    batch_size: int


def sparse_optimizer(cfg: OptimConfig, device_type: str) -> tuple[type, dict]:
    """The optimizer class and kwargs fused into the embedding backward."""
    if device_type == "cpu" and cfg.sparse not in CPU_SPARSE_OPTIMIZERS:
        raise ValueError(f"train.optim.sparse: '{cfg.sparse}' is not supported by fbgemm on CPU "
                         f"(supported there: {', '.join(CPU_SPARSE_OPTIMIZERS)}); use a GPU or change it")
    if cfg.sparse == "rowwise_adagrad":
        return trec_optim.RowWiseAdagrad, {"lr": cfg.sparse_lr, "eps": cfg.eps}
    if cfg.sparse == "adagrad":
        return trec_optim.Adagrad, {"lr": cfg.sparse_lr, "eps": cfg.eps}
    if cfg.sparse == "sgd":
        return trec_optim.SGD, {"lr": cfg.sparse_lr}
    return trec_optim.Adam, {"lr": cfg.sparse_lr, "eps": cfg.eps, "weight_decay": cfg.weight_decay}


def embedding_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, EmbeddingBagCollection | EmbeddingCollection)
            for p in m.parameters()]


def tag_sparse_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> None:
    """Mark every embedding parameter with its in-backward optimizer (the planner counts its state)."""
    cls, kwargs = sparse_optimizer(cfg, device_type)
    _apply_optimizer_in_backward(cls, embedding_parameters(model), kwargs)


def sharders() -> list[ModuleSharder]:
    return [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]


def constraints(inputs: ShardingInputs, device_type: str) -> dict[str, ParameterConstraints]:
    """Per-table planner constraints: config first, then the defaults that keep training well defined.

    data_parallel only where the config allows it: a DP table is trained by the dense optimizer
    (Adam) instead of the fused sparse one, so letting the planner pick DP would change the
    optimizer with the world size. Sequence (EmbeddingCollection) tables never use DP or the dense
    kernel on CPU: the fbgemm CPU kernel pools what it must not (torchrec#1255, FBGEMM#4586).
    Pooling factors tell the planner how many ids a sample brings per feature (max_len for histories).
    """
    schema, out = inputs.schema, {}
    seq_tables = {t.name for t in schema.sequence_tables}
    for table in schema.tables:
        feats = [f for f in schema.features if f.table == table.name]
        if not feats:
            continue
        user = inputs.sharding.constraints.get(table.name)
        types = list(user.sharding_types) if user and user.sharding_types else None
        kernels = list(user.compute_kernels) if user and user.compute_kernels else None
        if types is None:
            types = list(DEFAULT_ORDER[1:])
            if table.name in seq_tables:  # the EC sharder offers no table_row_wise / table_column_wise
                types = types[:3]
        if table.name in seq_tables and device_type == "cpu":
            types = [t for t in types if t != "data_parallel"]
            kernels = [k for k in (kernels or ["fused"]) if k != "dense"]
            if not types or not kernels:
                raise ValueError(f"sharding.constraints.{table.name}: sequence tables cannot use data_parallel "
                                 "or the dense kernel on CPU (fbgemm bug); allow table_wise/row_wise/column_wise")
        out[table.name] = ParameterConstraints(
            sharding_types=types, compute_kernels=kernels,
            pooling_factors=[float(max(f.max_len, 1)) for f in feats])
    return out


def topology(sharding: ShardingConfig, world_size: int, local_world_size: int, device_type: str,
             hbm_gb: float | None = None, ddr_gb: float | None = None) -> Topology:
    hbm = planner_hbm_gib(hbm_gb, sharding.hbm_gb, device_total_bytes(device_type))
    ddr = ddr_gb if ddr_gb is not None else sharding.ddr_gb
    hardware = HardwareConfig(**({"hbm_cap_bytes": int(hbm * GIB)} if hbm is not None else {}),
                              **({"ddr_cap_bytes": int(ddr * GIB)} if ddr is not None else {}))
    return TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=world_size, local_world_size=local_world_size),
        hardware_config=hardware, kernel_config=KernelConfig(compute_device=device_type))


class OrderedEnumerator(EmbeddingEnumerator):
    """The stock enumerator, with each table's options in the order its constraint lists them.

    torchrec intersects the allowed and constrained sharding types (and kernels) as Python sets, so
    the option order follows the process's string-hash seed. Options often tie on cost (on CPU,
    table_wise, column_wise and table_column_wise of a small table cost the same) and the proposers
    keep the first of equals, so without this the same config gave a different plan from one
    process to the next: `trec-rank plan` and the job's own collective plan could disagree.
    """

    def enumerate(self, module: nn.Module, sharders: list[ModuleSharder[nn.Module]]) -> list[ShardingOption]:
        options = super().enumerate(module, sharders)
        tables = {o.fqn: i for i, o in reversed(list(enumerate(options)))}

        def key(o: ShardingOption) -> tuple:
            want = (self._constraints or {}).get(o.name)
            types = list(want.sharding_types) if want and want.sharding_types else DEFAULT_ORDER
            kernels = list(want.compute_kernels) if want and want.compute_kernels else []
            return (tables[o.fqn], types.index(o.sharding_type) if o.sharding_type in types else len(types),
                    kernels.index(o.compute_kernel) if o.compute_kernel in kernels else len(kernels),
                    o.compute_kernel)
        return sorted(options, key=key)


def planner(inputs: ShardingInputs, topo: Topology, device_type: str, batch_size: int | None = None,
            stats: list | None = None) -> EmbeddingShardingPlanner:
    cons = constraints(inputs, device_type)
    batch_size = batch_size or inputs.batch_size
    return EmbeddingShardingPlanner(
        topology=topo, batch_size=batch_size, constraints=cons,
        enumerator=OrderedEnumerator(topology=topo, batch_size=batch_size, constraints=cons),
        storage_reservation=HeuristicalStorageReservation(percentage=0.15),
        **({"stats": stats} if stats is not None else {}))


def shard(model: nn.Module, inputs: ShardingInputs, device: torch.device,
          plan: ShardingPlan | None = None) -> DistributedModelParallel:
    """Plan collectively (rank 0 plans, all receive) unless a plan is given, then wrap in DMP."""
    world = dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if plan is None:
        topo = topology(inputs.sharding, world, local_world, device.type)
        plan = planner(inputs, topo, device.type).collective_plan(model, sharders(), dist.GroupMember.WORLD)
    return DistributedModelParallel(model, device=device, plan=plan, sharders=sharders(),
                                    env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                    data_parallel_wrapper=OneRankWrapper() if world == 1 else None)


class OneRankWrapper(DataParallelWrapper):
    """On one rank the dense part needs no DDP: there is nothing to all-reduce or broadcast.

    DDP would still run its reducer every step (a hook per parameter, copies into and out of its
    buckets, a gloo call on one rank): about a tenth of a small model's CPU step. DMP's parameter and
    state-dict names do not include DDP's `module.` (DMP strips it), so checkpoints are the same
    either way and a one-rank run resumes a many-rank run's checkpoint and back."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        dmp._dmp_wrapped_module.to(device)
