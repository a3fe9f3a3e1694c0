"""Ranking datasets: a config's split as a ParquetDataset, and GAUC group ids of a batch."""

from __future__ import annotations

from pathlib import Path

import torch

from trec_rank.config.experiment import ExperimentConfig
from trec_rank.config.models import side_bounds
from trec_rank.data.batch import Batch
from trec_rank.data.dataset import ParquetDataset, pin_for
from trec_rank.parallel.env import DistEnv


def open_split(cfg: ExperimentConfig, split: str, env: DistEnv, train: bool, with_labels: bool = True,
               path: Path | None = None) -> ParquetDataset:
    d = cfg.data
    return ParquetDataset(
        path or d.split_path(split), cfg.schema, d.batch_size if train else d.eval_batch_size,
        rank=env.rank, world_size=env.world_size, shuffle=train and d.shuffle, seed=d.seed,
        drop_last=train and d.drop_last, shuffle_buffer=d.shuffle_buffer, num_workers=d.num_workers,
        with_labels=with_labels, validate=d.validate, side_bounds=side_bounds(cfg.model.typed_params),
        pin_memory=pin_for(env.device))


def group_ids(batch: Batch, feature: str) -> torch.Tensor | None:
    """Ids of a single-valued sparse feature (GAUC groups), from whichever KJT carries it."""
    if not feature:
        return None
    kjt = batch.sparse if feature in batch.sparse.keys() else batch.sequence
    return kjt[feature].values()
