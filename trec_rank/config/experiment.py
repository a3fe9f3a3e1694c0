"""The experiment config: one YAML file = data + schema + model + training + sharding.

Loading validates everything up front (unknown keys, types, model params against the model's own
dataclass, losses that name unknown tasks), so a bad key fails in a second, not after the
data scan or the first collective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trec_rank.config.encoder import HSTUTokenParams
from trec_rank.config.models import EsmmParams, parse_params
from trec_rank.config.schema import Schema, inline_schema
from trec_rank.config.typed import ConfigError, beside_config, check_min, load_file, read_yaml


@dataclass
class DataConfig:
    path: str  # dataset root holding one directory per split; resolved at load (typed.beside_config)
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
        check_min(self, key, 1, "batch_size", "eval_batch_size", "shuffle_buffer")
        check_min(self, key, 0, "num_workers")

    def split_path(self, split: str) -> Path:
        """`path` was resolved at load (relative to the config file where that is where it exists)."""
        return Path(self.path) / split


@dataclass
class ModelConfig:
    """`params` stays the mapping as written: it is what config.json and the checkpoint fingerprint
    record, so a params field added later with a default does not refuse existing checkpoints.
    `typed_params` is that mapping parsed into the model's dataclass, once, at load; code reads it."""

    name: str = "base"
    tasks: list[str] = field(default_factory=list)  # default: every label in the schema
    params: dict[str, Any] = field(default_factory=dict)
    typed_params: Any = field(default=None, init=False, repr=False)  # set by ExperimentConfig.post_load


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
    pipeline: bool | None = None  # TrainPipelineSparseDist; null: on for GPUs and several ranks (see pipelined())
    log_every: int = 50
    seed: int = 0
    loss_weights: dict[str, float] = field(default_factory=dict)
    nan_policy: Literal["stop", "skip"] = "stop"  # skip: drop the batch on every rank (plain loop, no pipeline)
    log_rows: bool = False  # write RUN_DIR/rows/rank-N.jsonl: the dataset rows of every step (exactly-once audits)
    compile: bool = False  # the dense over-arch under torch.compile (inductor) in training; eval stays eager
    optim: OptimConfig = field(default_factory=OptimConfig)

    def post_load(self, key: str) -> None:
        check_min(self, key, 1, "epochs", "keep_checkpoints")
        if self.compile:
            import torch._dynamo  # only when asked for: importing the compiler stack costs a second

            if not torch._dynamo.is_dynamo_supported():
                raise ConfigError(f"{key}.compile: torch.compile is not supported on this Python/platform; "
                                  "set it to false")


ShardingType = Literal["data_parallel", "table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise"]


@dataclass
class TableConstraint:
    sharding_types: list[ShardingType] = field(default_factory=list)
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
    source: str = field(default="", init=False)  # the YAML file it was loaded from ("" when built in code)

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
        self.model.typed_params = parse_params(self.model.name, self.model.params)  # also when `model:` is absent
        if isinstance(self.model.typed_params, EsmmParams):  # ESMM's outputs are tied to two tasks
            self.model.typed_params.check_tasks(self.model.tasks, self.train.loss_weights)
        params = self.model.typed_params
        hstu = getattr(getattr(params, "encoder", None), "hstu", None)
        if self.train.compile and (isinstance(params, HSTUTokenParams) or isinstance(hstu, HSTUTokenParams)):
            raise ConfigError("train.compile: not supported with the HSTU encoder (model.name hstu or "
                              "model.params.encoder.hstu): compiling it took minutes per training step; "
                              "set it to false")


def read_config(path: str | Path) -> dict:
    """The YAML mapping with its schema file(s) inlined: the form `--set` overrides and validation see."""
    raw = read_yaml(path)
    if "schema" in raw:
        try:
            raw["schema"] = inline_schema(raw["schema"], Path(path).parent)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    return raw


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read YAML (schema files inlined), apply `--set key=value` overrides, validate, resolve data.path;
    errors name the file and key."""
    cfg = load_file(ExperimentConfig, path, overrides, read_config)
    cfg.data.path = beside_config(cfg.data.path, path)
    return cfg
