"""The experiment config: one YAML file = data + schema + model + training + sharding.

Loading validates everything up front (unknown keys, types, model params against the model's own
dataclass, losses that name unknown tasks), so a bad key fails in a second, not after the
data scan or the first collective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trec_rank.config.schema import Schema
from trec_rank.config.typed import ConfigError, load_file


@dataclass
class DataConfig:
    path: str  # dataset root holding one directory per split
    batch_size: int = 256
    eval_batch_size: int = 1024
    shuffle: bool = True
    shuffle_buffer: int = 8192
    seed: int = 0
    drop_last: bool = True
    num_workers: int = 0
    validate: Literal["full", "schema"] = "full"  # full: scan every value on open; schema: types only
    train_split: str = "train"
    eval_splits: list[str] = field(default_factory=lambda: ["valid", "test"])
    group_by: str = ""  # single-id sparse feature whose groups GAUC averages over, e.g. user_id ("": no GAUC)

    def post_load(self, key: str) -> None:
        for name in ("batch_size", "eval_batch_size", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ConfigError(f"{key}.num_workers: must be >= 0")

    def split_path(self, split: str, base: Path | None = None) -> Path:
        root = Path(self.path)
        if not root.is_absolute() and base is not None and not root.exists():
            root = base / root
        return root / split


@dataclass
class ModelConfig:
    name: str = "base"
    tasks: list[str] = field(default_factory=list)  # default: every label in the schema
    params: dict[str, Any] = field(default_factory=dict)  # checked against the model's params dataclass


@dataclass
class OptimConfig:
    sparse: Literal["rowwise_adagrad", "adagrad", "sgd", "adam"] = "rowwise_adagrad"
    sparse_lr: float = 0.05
    dense: Literal["adam", "adamw", "sgd"] = "adam"
    dense_lr: float = 1e-3
    weight_decay: float = 0.0
    eps: float = 1e-8


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int = 0  # 0: run all epochs
    eval_every: int = 0  # steps between evals on the eval splits; 0: at the end of each epoch
    checkpoint_every: int = 0  # steps; 0: at the end of each epoch
    keep_checkpoints: int = 2
    pipeline: bool = True  # TrainPipelineSparseDist; false: a plain loop (debugging)
    log_every: int = 50
    seed: int = 0
    loss_weights: dict[str, float] = field(default_factory=dict)
    nan_policy: Literal["stop", "skip"] = "stop"  # skip: drop the batch on every rank (plain loop, no pipeline)
    log_rows: bool = False  # write RUN_DIR/rows/rank-N.jsonl: the dataset rows of every step (exactly-once audits)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def post_load(self, key: str) -> None:
        if self.epochs < 1:
            raise ConfigError(f"{key}.epochs: must be >= 1, got {self.epochs}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"{key}.keep_checkpoints: must be >= 1")


@dataclass
class TableConstraint:
    sharding_types: list[Literal["data_parallel", "table_wise", "row_wise", "column_wise",
                                 "table_row_wise", "table_column_wise"]] = field(default_factory=list)
    compute_kernels: list[Literal["dense", "fused", "fused_uvm", "fused_uvm_caching", "key_value"]] = field(
        default_factory=list)


@dataclass
class ShardingConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    hbm_gb: float | None = None  # per-rank accelerator memory the planner may use (None: the device's)
    ddr_gb: float | None = None  # per-rank host memory
    constraints: dict[str, TableConstraint] = field(default_factory=dict)  # table name -> constraint


@dataclass
class ExperimentConfig:
    data: DataConfig
    schema: Schema
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)

    def post_load(self, key: str) -> None:
        labels = [f.name for f in self.schema.labels]
        if not self.model.tasks:
            self.model.tasks = labels
        for i, task in enumerate(self.model.tasks):
            if task not in labels:
                raise ConfigError(f"model.tasks[{i}]: '{task}' is not a label feature (labels: {labels})")
        for task in self.train.loss_weights:
            if task not in self.model.tasks:
                raise ConfigError(f"train.loss_weights.{task}: not a task of the model ({self.model.tasks})")
        for table in self.sharding.constraints:
            if table not in {t.name for t in self.schema.tables}:
                raise ConfigError(f"sharding.constraints.{table}: unknown table")
        if self.data.group_by:
            sparse = [f.name for f in self.schema.of_kind("sparse")]
            if self.data.group_by not in sparse:
                raise ConfigError(f"data.group_by: '{self.data.group_by}' is not a sparse feature ({sparse})")
        from trec_rank.models.registry import check_params  # models import config, not the reverse

        check_params(self.model.name, self.model.params)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read YAML, apply `--set key=value` overrides, validate; errors name the file and key."""
    return load_file(ExperimentConfig, path, overrides)
