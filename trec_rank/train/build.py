"""Assemble the pieces of a run: sharded model, optimizers, datasets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from trec_rank.config.experiment import ExperimentConfig, OptimConfig
from trec_rank.config.typed import to_dict
from trec_rank.data.batch import Batch
from trec_rank.data.dataset import ParquetDataset
from trec_rank.models.ranking import TrainWrapper
from trec_rank.models.registry import build_model
from trec_rank.parallel.env import DistEnv
from trec_rank.parallel.sharding import shard, tag_sparse_optimizer


def schema_fingerprint(cfg: ExperimentConfig) -> str:
    """Hash of what a checkpoint's tensors depend on: tables, features, model name and params."""
    blob = json.dumps({"schema": to_dict(cfg.schema), "model": to_dict(cfg.model)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_train_model(cfg: ExperimentConfig, env: DistEnv, plan: ShardingPlan | None = None
                      ) -> DistributedModelParallel:
    torch.manual_seed(cfg.train.seed)  # same dense init on every rank (DDP also broadcasts rank 0's)
    wrapper = TrainWrapper(build_model(cfg, torch.device("meta")), cfg.model.tasks, cfg.train.loss_weights)
    tag_sparse_optimizer(wrapper, cfg.train.optim, env.device.type)
    return shard(wrapper, cfg, env.device, plan)


def dense_optimizer(params: dict[str, nn.Parameter], cfg: OptimConfig) -> KeyedOptimizerWrapper:
    """Adam/AdamW use the fused kernel (one op for every tensor; ~7x faster than torch's CPU default,
    a Python loop over the dozens of small dense tensors, which cost ~2 ms a step): the same update
    rule, equal to the loop's up to float rounding (tests/test_speed_equivalence.py). SGD: foreach."""

    def make(ps):  # noqa: ANN001, ANN202
        if cfg.dense == "sgd":
            return torch.optim.SGD(ps, lr=cfg.dense_lr, weight_decay=cfg.weight_decay, foreach=True)
        cls = torch.optim.AdamW if cfg.dense == "adamw" else torch.optim.Adam
        return cls(ps, lr=cfg.dense_lr, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=True)

    return KeyedOptimizerWrapper(params, make)


def build_optimizer(dmp: DistributedModelParallel, cfg: OptimConfig) -> CombinedOptimizer:
    """Fused (in-backward) optimizer for the tables + a regular one for everything else.

    `in_backward_optimizer_filter` keeps fused tables, which still appear in named_parameters(),
    out of the dense optimizer, so no table is updated twice."""
    dense = dense_optimizer(dict(in_backward_optimizer_filter(dmp.named_parameters())), cfg)
    dense.init_state()  # materialise lazy Adam state so a checkpoint can be loaded into it
    return CombinedOptimizer([dmp.fused_optimizer, dense])


def open_split(cfg: ExperimentConfig, split: str, env: DistEnv, train: bool, with_labels: bool = True,
               path: Path | None = None) -> ParquetDataset:
    d = cfg.data
    base = Path(getattr(cfg, "source", ".")).parent
    return ParquetDataset(
        path or d.split_path(split, base), cfg.schema, d.batch_size if train else d.eval_batch_size,
        rank=env.rank, world_size=env.world_size, shuffle=train and d.shuffle, seed=d.seed,
        drop_last=train and d.drop_last, shuffle_buffer=d.shuffle_buffer, num_workers=d.num_workers,
        with_labels=with_labels, validate=d.validate)


def group_ids(batch: Batch, feature: str) -> torch.Tensor | None:
    """Ids of a single-valued sparse feature (GAUC groups), from whichever KJT carries it."""
    if not feature:
        return None
    kjt = batch.sparse if feature in batch.sparse.keys() else batch.sequence
    return kjt[feature].values()
