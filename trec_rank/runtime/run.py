"""A run and its directory, for every job kind: ownership, config.json, metrics_history.jsonl,
metrics.json, throughput.json, checkpoints/ with the fingerprint check, the NaN policy and stops.

A run dir belongs to one run. `claim` refuses a dir that holds a run unless the job resumes it
(`--resume`) or replaces it (`--overwrite`); run.json (run id, model and config fingerprints) and
config.json are written once the first step has run, so a job that fails before training leaves
nothing that would refuse its corrected rerun. Files are written by rank 0; checkpoints by every
rank (DCP shards).

Host syncs: the loss of every step stays on the device in a `StepWindow`; once per logging
interval (and before any eval or save) one all-reduce and one host read decide, on every rank
alike, whether a loss was not finite (`NonFiniteLoss`, the step and rows named; exit code 3) and
whether a rank was asked to stop (SIGTERM/SIGINT: `Interrupted`, after a checkpoint).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from trec_rank.parallel.env import DistEnv
from trec_rank.runtime import checkpoint
from trec_rank.runtime.model import ModelSpec, check_layouts, fingerprint, table_layouts

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
# what a run writes into its dir; --overwrite removes exactly these, nothing else the dir may hold
RUN_ENTRIES = (RUN_FILE, "config.json", "metrics.json", "metrics_history.jsonl", "throughput.json", "best.json",
               "checkpoints", "best", "tb", "rows", "eval")


class NonFiniteLoss(RuntimeError):
    """Training stopped on a NaN/inf loss; the message names the step and the batch rows."""


class Interrupted(Exception):  # noqa: N818 - a stop the user asked for, not an error
    """SIGTERM/SIGINT: every rank stopped at `step`; the CLI prints `message` and exits non-zero."""

    def __init__(self, step: int, signum: int) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint step-{step} saved; rerun with --resume")
        self.step, self.signum = step, signum


def all_finite(loss: torch.Tensor) -> bool:
    """Whether the (scalar) loss is finite on every rank, now: the plain loop's per-step decision, which
    must come before the update. One host read; with 2+ ranks an all-reduce first (one rank: the read
    alone, where a flag tensor cost four more ops a step)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.isfinite(loss.detach()).all().to(torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)
    return math.isfinite(loss.detach().item())


class Rows(NamedTuple):
    """A step's dataset rows: its batch's row_index [B] and weights [B]. The real rows (weight > 0, not
    lockstep padding) are picked only when asked for (a NaN report, the row log), not on every step."""

    row_index: torch.Tensor
    weights: torch.Tensor

    def real(self) -> torch.Tensor:
        return self.row_index[self.weights > 0]


class StopSignal:
    """SIGTERM (cluster preemption) and SIGINT (Ctrl-C) ask for a stop at the next sync; a second
    SIGINT gets Python's default behaviour back (KeyboardInterrupt), for a job that does not stop."""

    def __init__(self) -> None:
        self.signum = 0
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def close(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


class StepWindow:
    """The losses (on the device) and dataset rows of the steps since the last sync."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.where: list[tuple[int, int, int, Rows | None]] = []  # (step, epoch, batch_in_epoch, rows)

    def add(self, loss: torch.Tensor, step: int, epoch: int, batch: int, rows: Rows | None = None) -> None:
        self.losses.append(loss.detach().reshape(()))
        self.where.append((step, epoch, batch, rows))

    def sync(self, stop: StopSignal | None, rank: int, kept: str) -> tuple[float, int]:
        """(this rank's mean loss over the window, the signal any rank got or 0); one host read.

        Raises NonFiniteLoss on every rank when any rank saw a non-finite loss in the window."""
        device = self.losses[0].device if self.losses else torch.device("cpu")
        losses = torch.stack(self.losses) if self.losses else torch.zeros(0, device=device)
        flags = torch.cat([torch.tensor([float(stop.signum if stop else 0)], device=device),
                           (~torch.isfinite(losses)).to(torch.float32)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        host = torch.cat([flags, losses.float().mean().reshape(1) if len(losses) else flags[:1] * 0]).tolist()
        signum, bad, mean = int(host[0]), host[1:-1], host[-1]
        if any(bad):
            step, epoch, batch, where = self.where[bad.index(1.0)]
            rows = where.real() if where is not None else torch.zeros(0)
            span = f"{int(rows.min())}..{int(rows.max())}" if rows.numel() else "padding"
            raise NonFiniteLoss(f"non-finite loss at step {step} (epoch {epoch}, batch {batch}, dataset rows {span} "
                                f"on rank {rank}); {kept}")
        self.losses, self.where = [], []
        return mean, signum


class Stopwatch:
    """Training seconds: everything but the intervals spent `paused` (evals, saves)."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.before = seconds
        self.start_now()

    def start_now(self) -> None:
        self.start, self.paused_s = time.perf_counter(), 0.0

    @property
    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.start - self.paused_s

    def pause(self) -> float:
        return time.perf_counter()

    def resume(self, since: float) -> None:
        self.paused_s += time.perf_counter() - since


def describe(run_dir: Path) -> str | None:
    """What a run dir holds, for the refusal message; None when it holds no run."""
    if not any((run_dir / e).exists() for e in RUN_ENTRIES):
        return None
    parts = []
    if (run_dir / RUN_FILE).is_file():
        parts.append(f"run {json.loads((run_dir / RUN_FILE).read_text()).get('run_id')}")
    found = checkpoint.complete_checkpoints(run_dir / "checkpoints")
    if found:
        parts.append(f"{len(found)} checkpoint(s) up to {found[-1].name}")
    parts += [name for name in ("metrics.json", "config.json") if (run_dir / name).is_file()]
    return ", ".join(parts) or "files of an earlier run"


def claim(run_dir: str | Path, env: DistEnv, resume: bool, overwrite: bool) -> None:
    """Before anything is built: refuse (every rank alike) a dir holding a run unless the job resumes
    it; --overwrite removes the earlier run's files (and only those)."""
    run_dir = Path(run_dir)
    held = describe(run_dir)
    if held and not resume and not overwrite:
        raise ValueError(f"--run-dir {run_dir}: holds an earlier run ({held}); continue it with --resume, "
                         "or train into a new --run-dir (or pass --overwrite to replace it)")
    dist.barrier()  # every rank has looked before rank 0 removes anything
    if held and overwrite and not resume and env.is_main:
        for name in RUN_ENTRIES:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        log.info("--overwrite: removed the earlier run in %s", run_dir)
    dist.barrier()


class Run:
    """One run's directory and checkpoints. `config` is the typed config as a dict (config.json, and
    every checkpoint's state); `source` names the config in messages."""

    def __init__(self, run_dir: str | Path, env: DistEnv, spec: ModelSpec, config: dict[str, Any], source: str) -> None:
        self.dir, self.env, self.spec, self.config, self.source = Path(run_dir), env, spec, config, source
        self.saved_step = -1
        self.started = False

    def start(self) -> None:
        """After the first step: the run's id, fingerprints and config, once (a resume keeps the id)."""
        if self.started or not self.env.is_main:
            return
        self.started = True
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / RUN_FILE).is_file():
            self.write_json(RUN_FILE, {"run_id": uuid.uuid4().hex[:12], "fingerprint": self.spec.fingerprint,
                                       "config_fingerprint": fingerprint(self.config)})
        (self.dir / "config.json").write_text(json.dumps(self.config, indent=1))

    def sync(self, window: StepWindow, stop: StopSignal | None, step: int, save: Callable[[], Any]) -> float:
        """The one host sync of a logging interval, on every rank alike: NaN check (NonFiniteLoss), the
        run's files once a step has run, and a stop request (a checkpoint at `step` unless it has one,
        then Interrupted). Returns this rank's mean loss over the window."""
        mean, signum = window.sync(stop, self.env.rank, f"last good checkpoint kept in {self.dir / 'checkpoints'}")
        self.start()
        if signum:
            if self.saved_step != step:
                save()
            raise Interrupted(step, signum)
        return mean

    def append_history(self, entry: dict[str, Any]) -> None:
        if self.env.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.dir / "metrics_history.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")

    def truncate_history(self, step: int, eval_pending: bool) -> None:
        """On resume from `step`: drop the entries a killed attempt wrote after it, which are redone. The
        entry *at* `step` is redone only when the checkpoint says its eval is pending (saved right before
        it); otherwise that eval belongs to the checkpoint's past and is kept (a checkpoint written after
        its eval would otherwise lose that epoch's line for good)."""
        path = self.dir / "metrics_history.jsonl"
        if self.env.is_main and path.is_file():
            last = step - 1 if eval_pending else step  # the newest step whose eval is kept
            keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= last]
            path.write_text("".join(line + "\n" for line in keep))

    def write_json(self, name: str, value: dict[str, Any], sort_keys: bool = True) -> None:
        if self.env.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / name).write_text(json.dumps(value, indent=1, sort_keys=sort_keys))

    def save(self, step: int, model: torch.nn.Module, optimizer: Any, state: dict[str, Any], keep: int,
             root: str = "checkpoints") -> Path:
        """A complete checkpoint RUN_DIR/root/step-N; `state` is the trainer's position (step, epoch, ...)."""
        state = {**state, "step": step, "world_size": self.env.world_size, "fingerprint": self.spec.fingerprint,
                 "layouts": table_layouts(model), "config": self.config}
        self.saved_step = step
        return checkpoint.save(self.dir / root, step, model, optimizer, state, keep)

    def load(self, ckpt: Path, model: torch.nn.Module, optimizer: Any | None) -> dict[str, Any]:
        """Weights and optimizer state of a checkpoint of this model (`--resume`); its trainer state.
        With `optimizer` None (`--init-from`: fine-tuning, A/B inits) the optimizer state stays fresh."""
        saved = checkpoint.check(ckpt, self.spec.fingerprint, self.source, "--init-from" if optimizer is None else
                                 "--resume")
        if optimizer is not None:
            check_layouts(saved.get("layouts", {}), table_layouts(model), self.spec.optim)
        state = checkpoint.load(ckpt, model, optimizer)
        if optimizer is None:
            log.info("initialised weights from %s", ckpt)
        else:
            self.saved_step = state["step"]
            self.truncate_history(state["step"], bool(state.get("eval_pending", False)))
            log.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt, state["step"], state["epoch"],
                     state["batch_in_epoch"])
        return state
