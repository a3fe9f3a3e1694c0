"""The sharded model and its optimizers, for any job kind: what a job builds, how it is sharded.

A `ModelSpec` is all that planning, training, eval and scoring need to know about a job's model:
the module DMP wraps (built on `meta`, so planning a terabyte of tables costs nothing), the
optimizer settings (the fused sparse optimizer changes the memory plan), the sharding inputs and
the fingerprint a checkpoint of it carries. Ranking's spec is here because training, eval and
scoring all build it; retrieval's comes from `trec_rank.retrieval.trainer`.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import LazyAwaitable, ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from trec_rank.config.experiment import ExperimentConfig, OptimConfig
from trec_rank.config.typed import to_dict
from trec_rank.models.encoder import FeatureEncoder
from trec_rank.models.ranking import RankingModel, TrainWrapper
from trec_rank.models.registry import STATE_LAYOUTS, build_model
from trec_rank.parallel.env import DistEnv
from trec_rank.parallel.sharding import ShardingInputs, shard, tag_sparse_optimizer

ADAM_BETAS = (0.9, 0.999)  # torch's default


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[], nn.Module]  # the module DMP wraps, on meta
    optim: OptimConfig
    inputs: ShardingInputs
    fingerprint: str  # what a checkpoint's tensors depend on; checkpoint.check compares it
    seed: int  # dense init: the same on every rank (DDP also broadcasts rank 0's)
    adam_betas: tuple[float, float] = ADAM_BETAS


def fingerprint(blob: dict) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def ranking_spec(cfg: ExperimentConfig, id_counts: dict[str, np.ndarray] | None = None) -> ModelSpec:
    """Ranking: TrainWrapper (losses, weights) around the registry's model; plans key on its paths.

    `id_counts` (trec_rank.data.frequency.train_id_counts) only for training with the mini-batch L2:
    eval, scoring and planning never compute the regularizer, so they build without them."""
    return ModelSpec(
        build=lambda: TrainWrapper(build_model(cfg, torch.device("meta"), id_counts=id_counts), cfg.model.tasks,
                                   cfg.train.loss_weights),
        optim=cfg.train.optim, inputs=ShardingInputs(cfg.schema, cfg.sharding, cfg.data.batch_size),
        fingerprint=fingerprint(_fingerprinted(cfg)), seed=cfg.train.seed)


def _fingerprinted(cfg: ExperimentConfig) -> dict:
    """What a ranking checkpoint's tensors depend on: schema, model config and the over-arch's layout
    version (only where it was raised, so checkpoints of unchanged models keep their fingerprint)."""
    blob = {"schema": to_dict(cfg.schema), "model": to_dict(cfg.model)}
    if cfg.model.name in STATE_LAYOUTS:
        blob["layout"] = STATE_LAYOUTS[cfg.model.name]
    return blob


def planning_model(spec: ModelSpec, device_type: str) -> nn.Module:
    """The meta module with its embedding parameters tagged with the fused sparse optimizer."""
    model = spec.build()
    tag_sparse_optimizer(model, spec.optim, device_type)
    return model


def shard_model(spec: ModelSpec, env: DistEnv, plan: ShardingPlan | None = None) -> DistributedModelParallel:
    torch.manual_seed(spec.seed)
    return shard(planning_model(spec, env.device.type), spec.inputs, env.device, plan)


def _ready(x: Any) -> Any:
    """A sharded module's output as the tensors it stands for: waits on a LazyAwaitable (the output
    all-to-all of the embeddings), which must happen before, not inside, the compiled region."""
    return x.wait() if isinstance(x, LazyAwaitable) else x


def compile_over_arch(dmp: nn.Module) -> None:
    """`train.compile`: the ranking model's dense over-arch forward under torch.compile (inductor).

    Only the over-arch: the sharded modules and the pipeline's rewritten forwards around them are
    TorchRec's runtime (awaitables, collectives), while the over-arch is tensors in, logits out, and a
    leaf for TrainPipelineSparseDist's tracer, which keeps calling it as one module. What is compiled
    is its class's `forward`, called by a wrapper set on the instance after the embeddings' awaitables
    are waited: with 2+ ranks the pooled output arrives as a LazyAwaitable whose wait runs an autograd
    all-to-all that dynamo cannot trace. The module itself is unchanged, so parameter names, the state
    dict and checkpoints are the eager model's (wrapping the module in torch.compile() would add
    `_orig_mod.`).
    dynamic=True from the first call: the jagged behaviour count N changes on every batch and B on a
    last partial batch; without it dynamo compiles static shapes first and recompiles on the second
    batch."""
    over = [m.over for m in dmp.modules() if isinstance(m, RankingModel)]
    assert len(over) == 1, f"expected one RankingModel in the sharded model, found {len(over)}"
    # The class's forward, compiled, called with the module through a weak reference: the wrapper is
    # stored on the module, and holding the module (or its bound method) from there would be a cycle
    # that keeps the whole over-arch and its compiled code alive until a garbage-collector pass.
    compiled = torch.compile(type(over[0]).forward, dynamic=True)
    module = weakref.ref(over[0])
    encoder = getattr(over[0], "encoder", None)

    def forward(pooled: Any, jagged: Any, *args: Any, **kwargs: Any) -> Any:
        pooled, jagged = _ready(pooled), _ready(jagged)
        if isinstance(encoder, FeatureEncoder) and jagged is not None:  # value checks stay out of the graph
            encoder.check_aligned(jagged, kwargs.get("batch"))
        return compiled(module(), pooled, jagged, *args, **kwargs)

    over[0].forward = forward


def table_layouts(dmp: nn.Module) -> dict[str, dict]:
    """{module.table: {"sharding_type", "columns": widths of its column blocks}} of a sharded model.

    A row-wise optimizer state (rowwise_adagrad: one value per row and column block) can be
    resharded across rows and ranks but not across column blocks; `check_layouts` compares these."""
    plan = getattr(dmp, "plan", None)
    out = {}
    for module, tables in (plan.plan.items() if plan is not None else ()):
        for table, ps in tables.items():
            shards = ps.sharding_spec.shards if ps.sharding_spec is not None else []
            columns = sorted({(s.shard_offsets[1], s.shard_sizes[1]) for s in shards})
            out[f"{module}.{table}"] = {"sharding_type": ps.sharding_type, "columns": [w for _, w in columns]}
    return out


def check_layouts(saved: dict[str, dict], current: dict[str, dict], optim: OptimConfig) -> None:
    """Refuse a resume whose plan splits a table's columns differently when its optimizer state is row-wise."""
    if optim.sparse != "rowwise_adagrad":
        return
    for name, now in current.items():
        was = saved.get(name)
        if was is not None and was["columns"] != now["columns"]:
            table = name.rsplit(".", 1)[-1]
            raise ValueError(
                f"--resume: table {table} was trained {was['sharding_type']} ({len(was['columns'])} column block(s)) "
                f"and is now {now['sharding_type']} ({len(now['columns'])}); its rowwise_adagrad state cannot be "
                f"split across other columns. Resume with sharding.constraints.{table}.sharding_types: "
                f"[{was['sharding_type']}] on the same world size, or start from its weights with --init-from")


def dense_optimizer(params: dict[str, nn.Parameter], cfg: OptimConfig,
                    betas: tuple[float, float] = ADAM_BETAS) -> KeyedOptimizerWrapper:
    """Adam/AdamW use the fused kernel (one op for every tensor; ~7x faster than torch's CPU default,
    a Python loop over the dozens of small dense tensors, which cost ~2 ms a step): the same update
    rule, equal to the loop's up to float rounding (tests/test_speed_equivalence.py). SGD: foreach."""

    def make(ps):  # noqa: ANN001, ANN202
        if cfg.dense == "sgd":
            return torch.optim.SGD(ps, lr=cfg.dense_lr, weight_decay=cfg.weight_decay, foreach=True)
        cls = torch.optim.AdamW if cfg.dense == "adamw" else torch.optim.Adam
        return cls(ps, lr=cfg.dense_lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=True)

    return KeyedOptimizerWrapper(params, make)


def build_optimizer(dmp: DistributedModelParallel, spec: ModelSpec) -> CombinedOptimizer:
    """Fused (in-backward) optimizer for the tables + a regular one for everything else.

    `in_backward_optimizer_filter` keeps fused tables, which still appear in named_parameters(),
    out of the dense optimizer, so no table is updated twice."""
    dense = dense_optimizer(dict(in_backward_optimizer_filter(dmp.named_parameters())), spec.optim, spec.adam_betas)
    dense.init_state()  # materialise lazy Adam state so a checkpoint can be loaded into it
    return CombinedOptimizer([dmp.fused_optimizer, dense])
