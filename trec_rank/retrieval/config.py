"""The retrieval experiment config (`kind: retrieval` YAML files), typed and validated on load.

Retrieval trains on one row per user (an item sequence), not on labelled events, so it has its
own top-level dataclass; the sections it shares with ranking (`train.optim`, `sharding`) are the
same dataclasses, so the same keys mean the same thing in both kinds of config.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trec_rank.config.encoder import HSTUConfig, SASRecConfig
from trec_rank.config.experiment import OptimConfig, ShardingConfig, ShardingType
from trec_rank.config.typed import ConfigError, beside_config, check_min, from_dict, load_file, read_yaml, to_dict

ITEM_TABLE = "item"
# EmbeddingCollection tables: table- or row-wise with the fused kernel; never data_parallel (its dense kernel
# pools sequence outputs on CPU, torchrec#1255 / FBGEMM#4586)
ITEM_SHARDING: tuple[ShardingType, ...] = ("table_wise", "row_wise")
ENCODERS: dict[str, type] = {"hstu": HSTUConfig, "sasrec": SASRecConfig}


@dataclass
class SequenceData:
    path: str  # a directory of Parquet files with one row per user (e.g. data/ml-100k/sequences); resolved at load
    items_column: str = "item_ids"  # list<int64>, oldest first
    time_column: str = "timestamps"  # list<int64> seconds, aligned with the items
    # action-aware models: list<int64> aligned with the items (e.g. "ratings"), each history token = item
    # embedding + the action's embedding (docs/compare.md); values in [1, num_actions), 0 = unknown
    action_column: str = ""
    num_actions: int = 6
    max_seq_len: int = 200  # most recent items the encoder sees (the reference's max_sequence_length)
    batch_size: int = 128  # users per rank and step
    eval_batch_size: int = 512
    seed: int = 0

    def post_load(self, key: str) -> None:
        if self.action_column and self.num_actions < 2:
            raise ConfigError(f"{key}.num_actions: must be >= 2 with an action_column, got {self.num_actions}")
        check_min(self, key, 1, "max_seq_len", "batch_size", "eval_batch_size")


@dataclass
class ItemTable:
    num_embeddings: int  # ids in [1, num_embeddings); row 0 is padding and never a candidate
    embedding_dim: int = 52

    def post_load(self, key: str) -> None:
        if self.num_embeddings < 2 or self.embedding_dim < 1:
            raise ConfigError(f"{key}: need num_embeddings >= 2 and embedding_dim >= 1")
        if self.embedding_dim % 4:
            raise ConfigError(f"{key}.embedding_dim: fbgemm's table kernels need a multiple of 4, "
                              f"got {self.embedding_dim} (the paper's 50 -> 52)")


@dataclass
class EncoderSpec:
    """`params` as written (what the fingerprint hashes, like the ranking ModelConfig); `typed_params`:
    them as HSTUConfig / SASRecConfig, parsed once at load."""

    name: Literal["hstu", "sasrec"] = "hstu"
    params: dict[str, Any] = field(default_factory=dict)
    typed_params: HSTUConfig | SASRecConfig = field(default_factory=HSTUConfig, init=False, repr=False)

    def post_load(self, key: str) -> None:
        self.typed_params = from_dict(ENCODERS[self.name], self.params, f"{key}.params")

@dataclass
class LossConfig:
    """Sampled softmax over L2-normalised embeddings (the reference's SampledSoftmaxLoss)."""

    temperature: float = 0.05
    num_negatives: int = 128  # per position
    sampler: Literal["uniform", "in_batch"] = "uniform"  # over the corpus, or over the batch's targets

    def post_load(self, key: str) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"{key}.temperature: must be > 0, got {self.temperature}")
        check_min(self, key, 1, "num_negatives")


@dataclass
class RetrievalTrain:
    epochs: int = 100
    max_steps: int = 0  # 0: no step limit
    patience: int = 10  # epochs without a better valid ndcg@10 before stopping; 0: never stop early
    checkpoint_every: int = 0  # steps; 0: after every epoch's evaluation only
    keep_checkpoints: int = 2
    log_every: int = 20
    seed: int = 0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # the reference's AdamW betas
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(dense="adamw", sparse_lr=0.05))

    def post_load(self, key: str) -> None:
        check_min(self, key, 1, "epochs", "keep_checkpoints")
        check_min(self, key, 0, "max_steps", "patience", "checkpoint_every")
        if len(self.adam_betas) != 2:
            raise ConfigError(f"{key}.adam_betas: expected two numbers, got {self.adam_betas}")


@dataclass
class RetrievalEval:
    ks: list[int] = field(default_factory=lambda: [10, 50, 200])  # HR@k / NDCG@k cut-offs
    early_stop_metric: str = "ndcg@10"

    def post_load(self, key: str) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ConfigError(f"{key}.ks: need at least one cut-off >= 1, got {self.ks}")
        allowed = {"mrr"} | {f"{m}@{k}" for m in ("hr", "ndcg") for k in self.ks}
        if self.early_stop_metric not in allowed:
            raise ConfigError(f"{key}.early_stop_metric: '{self.early_stop_metric}' is not one of "
                              f"{sorted(allowed)}")


@dataclass
class RetrievalConfig:
    kind: Literal["retrieval"]
    data: SequenceData
    item: ItemTable
    model: EncoderSpec = field(default_factory=EncoderSpec)
    loss: LossConfig = field(default_factory=LossConfig)
    train: RetrievalTrain = field(default_factory=RetrievalTrain)
    eval: RetrievalEval = field(default_factory=RetrievalEval)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    source: str = field(default="", init=False)  # the YAML file it was loaded from ("" when built in code)

    def post_load(self, key: str) -> None:
        for table, constraint in self.sharding.constraints.items():
            if table != ITEM_TABLE:
                raise ConfigError(f"sharding.constraints.{table}: unknown table (retrieval has one: "
                                  f"'{ITEM_TABLE}')")
            bad = set(constraint.sharding_types) - set(ITEM_SHARDING)
            if bad:
                raise ConfigError(f"sharding.constraints.{table}.sharding_types: {sorted(bad)} not allowed for the "
                                  f"item EmbeddingCollection (use {', '.join(ITEM_SHARDING)})")

    def fingerprint(self) -> str:
        """Hash of what checkpoint tensors depend on (table shape, encoder and its params, max length)."""
        actions = {"actions": self.data.num_actions} if self.data.action_column else {}  # plain runs keep theirs
        blob = json.dumps({"item": to_dict(self.item), "model": to_dict(self.model),
                           "max_seq_len": self.data.max_seq_len, **actions}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_retrieval_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RetrievalConfig:
    """Read YAML, apply `--set key=value` overrides, validate, resolve data.path; errors name the file and key."""
    cfg = load_file(RetrievalConfig, path, overrides)
    cfg.data.path = beside_config(cfg.data.path, path)
    return cfg


def is_retrieval_config(path: str | Path) -> bool:
    """True when the YAML's top level says `kind: retrieval` (how `trec-rank train/eval` dispatch)."""
    return read_yaml(path).get("kind") == "retrieval"
