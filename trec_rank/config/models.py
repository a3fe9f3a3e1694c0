"""Typed params of every ranking model: `model.params` becomes its model's dataclass once, at load
(`parse_params`); `trec_rank.models.registry` builds from that object and never reads the mapping."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from trec_rank.config.encoder import Activation, EncoderParams, HSTUTokenParams
from trec_rank.config.typed import ConfigError, check_min, from_dict


@dataclass
class BaseParams:
    """The embedding + MLP base model: every feature pooled (histories mean/sum pooled, so their order
    and the target item do not interact), concatenated, one ReLU MLP, per-task heads: the floor every
    sequence model must beat."""

    hidden: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0
    history_pooling: Literal["mean", "sum"] = "mean"


@dataclass
class DinParams:
    encoder: EncoderParams = field(default_factory=EncoderParams)
    hidden: list[int] = field(default_factory=lambda: [200, 80])
    activation: Activation = "dice"
    dropout: float = 0.0

    def post_load(self, key: str) -> None:
        if not self.encoder.attention:
            raise ConfigError(f"{key}.encoder.attention: DIN needs at least one (target, history) group")


@dataclass
class TowerParams:
    """encoder: features (and DIN attention / feedback / L2); tower_hidden: per-task tower MLP."""

    encoder: EncoderParams = field(default_factory=EncoderParams)
    tower_hidden: list[int] = field(default_factory=lambda: [32])
    activation: Activation = "relu"
    dropout: float = 0.0


@dataclass
class SharedBottomParams(TowerParams):
    bottom: list[int] = field(default_factory=lambda: [128, 64])


@dataclass
class MoEParams(TowerParams):
    """Also the MMoE params: same experts, MMoE just gives every task its own gate."""

    experts: int = 4
    expert_hidden: list[int] = field(default_factory=lambda: [64])

    def post_load(self, key: str) -> None:
        if self.experts < 1 or not self.expert_hidden:
            raise ConfigError(f"{key}: needs experts >= 1 and a non-empty expert_hidden")


@dataclass
class CGCParams(TowerParams):
    shared_experts: int = 2
    task_experts: int = 2
    expert_hidden: list[int] = field(default_factory=lambda: [64])

    def post_load(self, key: str) -> None:
        if self.shared_experts < 1 or self.task_experts < 1 or not self.expert_hidden:
            raise ConfigError(f"{key}: needs shared_experts >= 1, task_experts >= 1 and a non-empty "
                              "expert_hidden")


@dataclass
class PLEParams(CGCParams):
    levels: int = 2

    def post_load(self, key: str) -> None:
        super().post_load(key)
        check_min(self, key, 1, "levels")


@dataclass
class EsmmParams(TowerParams):
    """Two towers (CTR, CVR) over the shared encoder."""

    tower_hidden: list[int] = field(default_factory=lambda: [200, 80])
    ctr_task: str = "watch"
    ctcvr_task: str = "like"
    cvr_output: str = "cvr"
    variant: Literal["esmm", "naive"] = "esmm"

    def subset_aucs(self) -> list[tuple[str, str, str]]:
        """(output, label task, given task) for the trainer's subset AUCs: `<cvr_output>/auc` is
        pCVR against the ctcvr label on clicked rows (ctr label 1), where that label is the conversion."""
        return [(self.cvr_output, self.ctcvr_task, self.ctr_task)]

    def check_tasks(self, tasks: list[str], loss_weights: dict[str, float]) -> None:
        """ESMM predicts exactly (ctr_task, ctcvr_task); the naive variant trains no pCTCVR loss."""
        key = "model.params"
        for name in ("ctr_task", "ctcvr_task"):
            if getattr(self, name) not in tasks:
                raise ConfigError(f"{key}.{name}: '{getattr(self, name)}' is not a task of the model ({tasks})")
        if self.ctr_task == self.ctcvr_task:
            raise ConfigError(f"{key}.ctcvr_task: must differ from ctr_task '{self.ctr_task}'")
        if sorted(tasks) != sorted([self.ctr_task, self.ctcvr_task]):
            raise ConfigError(f"model.tasks: ESMM predicts exactly [{self.ctr_task}, {self.ctcvr_task}], "
                              f"got {tasks}")
        if self.cvr_output in tasks:
            raise ConfigError(f"{key}.cvr_output: '{self.cvr_output}' collides with a task")
        if self.variant == "naive" and loss_weights.get(self.ctcvr_task, 1.0) != 0.0:
            raise ConfigError(f"train.loss_weights.{self.ctcvr_task}: must be 0 for variant 'naive' "
                              "(its CVR tower learns from watched rows only, not from the pCTCVR loss)")


@dataclass
class HSTUParams(HSTUTokenParams):
    """The `hstu` ranking over-arch: the token params plus its own MLP."""

    hidden: list[int] = field(default_factory=lambda: [128, 64])
    dropout: float = 0.0
    history_pooling: Literal["mean", "sum"] = "mean"  # for the other EmbeddingCollection features


MODEL_PARAMS: dict[str, type] = {
    "base": BaseParams, "din": DinParams, "shared_bottom": SharedBottomParams, "moe": MoEParams,
    "mmoe": MoEParams, "cgc": CGCParams, "ple": PLEParams, "esmm": EsmmParams, "hstu": HSTUParams,
}


def side_bounds(params: object) -> dict[str, tuple[int, str]]:
    """Side columns a model reads as embedding indices -> (bound, config key of the bound).

    Keys are Batch.side keys ("<history>/<side>"); values must lie in [0, bound). The loader checks
    them once per chunk on the host (data/convert.py), so the model's lookups need no per-step range
    check (a device reduction and a host read on every forward). A column bounded twice keeps the
    tighter bound. Retrieval's action column is checked by its own reader (retrieval/data.py)."""
    bounds: dict[str, tuple[int, str]] = {}

    def add(name: str, bound: int, key: str) -> None:
        if name not in bounds or bound < bounds[name][0]:
            bounds[name] = (bound, key)

    tokens: list[tuple[HSTUTokenParams, str]] = []
    if isinstance(params, HSTUParams):
        tokens.append((params, "model.params"))
    encoder = getattr(params, "encoder", None)
    if isinstance(encoder, EncoderParams):
        for i, group in enumerate(encoder.attention):
            for j, side in enumerate(group.key_sides):
                add(f"{side.history}/{side.side}", side.num_values,
                    f"model.params.encoder.attention[{i}].key_sides[{j}].num_values")
        if encoder.hstu is not None:
            tokens.append((encoder.hstu, "model.params.encoder.hstu"))
    for p, key in tokens:
        if p.action_side:
            add(f"{p.history}/{p.action_side}", p.num_actions, f"{key}.num_actions")
    return bounds


def parse_params(name: str, params: dict[str, Any], key: str = "model") -> Any:
    """`params` as model `name`'s params dataclass; errors name `<key>.name` or `<key>.params.<field>`."""
    if name not in MODEL_PARAMS:
        raise ConfigError(f"{key}.name: unknown model '{name}' (known: {', '.join(sorted(MODEL_PARAMS))})")
    return from_dict(MODEL_PARAMS[name], params, f"{key}.params")
