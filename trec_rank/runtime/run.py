"""A run and its directory, for every job kind: config.json, metrics_history.jsonl, metrics.json,
throughput.json, checkpoints/ with the fingerprint check, and the NaN policy.

Files are written by rank 0 only; checkpoints by every rank (DCP shards). A loss that is not
finite on any rank stops every rank at the same step (the decision is all-reduced) with
`NonFiniteLoss`, which the CLI turns into one `error:` line and exit code 3.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trec_rank.parallel.env import DistEnv
from trec_rank.runtime import checkpoint
from trec_rank.runtime.model import ModelSpec

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """Training stopped on a NaN/inf loss; the message names the step and the batch rows."""


def all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (one all-reduce; none on one rank)."""
    flag = torch.isfinite(loss.detach()).all().to(torch.float32).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


class Run:
    """One run's directory and checkpoints. `config` is the typed config as a dict (config.json, and
    every checkpoint's state); `source` names the config in messages."""

    def __init__(self, run_dir: str | Path, env: DistEnv, spec: ModelSpec, config: dict[str, Any], source: str) -> None:
        self.dir, self.env, self.spec, self.config, self.source = Path(run_dir), env, spec, config, source
        self.saved_step = -1
        if env.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "config.json").write_text(json.dumps(config, indent=1))

    def append_history(self, entry: dict[str, Any]) -> None:
        if self.env.is_main:
            with open(self.dir / "metrics_history.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")

    def write_json(self, name: str, value: dict[str, Any], sort_keys: bool = True) -> None:
        if self.env.is_main:
            (self.dir / name).write_text(json.dumps(value, indent=1, sort_keys=sort_keys))

    def save(self, step: int, model: torch.nn.Module, optimizer: Any, state: dict[str, Any], keep: int,
             root: str = "checkpoints") -> Path:
        """A complete checkpoint RUN_DIR/root/step-N; `state` is the trainer's position (step, epoch, ...)."""
        state = {**state, "step": step, "world_size": self.env.world_size, "fingerprint": self.spec.fingerprint,
                 "config": self.config}
        self.saved_step = step
        return checkpoint.save(self.dir / root, step, model, optimizer, state, keep)

    def load(self, ckpt: Path, model: torch.nn.Module, optimizer: Any | None) -> dict[str, Any]:
        """Weights (and optimizer state unless None) of a checkpoint of this model; its trainer state."""
        checkpoint.check(ckpt, self.spec.fingerprint, self.source)
        return checkpoint.load(ckpt, model, optimizer)
