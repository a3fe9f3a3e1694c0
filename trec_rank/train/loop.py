"""The training loop every model uses: pipelined sparse-dist steps, periodic eval, checkpoints.

Ranks run in lockstep (the sharded embeddings exchange data every step), so every iterator here
yields the same number of batches on every rank: the datasets pad short ranks with zero-weight
batches, and stop decisions (NaN, max_steps) are taken from values all ranks agree on.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import record_function
from torch.utils.tensorboard import SummaryWriter
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from tqdm import tqdm

from trec_rank.config.experiment import ExperimentConfig, TrainConfig
from trec_rank.config.typed import to_dict
from trec_rank.data.batch import Batch
from trec_rank.data.dataset import ParquetDataset
from trec_rank.data.frequency import train_id_counts
from trec_rank.parallel.env import DistEnv
from trec_rank.runtime import faults
from trec_rank.runtime.eval_rows import RankingRows
from trec_rank.runtime.metrics import EvalMetrics, subset_aucs
from trec_rank.runtime.model import build_optimizer, compile_over_arch, ranking_spec, shard_model
from trec_rank.runtime.run import Rows, Run, StepWindow, StopSignal, Stopwatch, all_finite
from trec_rank.train.build import group_ids, open_split

log = logging.getLogger(__name__)

@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # train.compile: eval runs the over-arch eager (no eval-mode graphs)
def evaluate(model: torch.nn.Module, ds: ParquetDataset, cfg: ExperimentConfig, env: DistEnv,
             rows: RankingRows | None = None, split: str = "") -> dict[str, float]:
    """The split's metrics; with `rows`, also every row's scores under `split` (for `trec-rank compare`)."""
    was_training = model.training
    model.eval()
    metrics = EvalMetrics(cfg.model.tasks, ds.batch_size, env.world_size, env.rank, env.device,
                          window_rows=ds.num_rows, subsets=subset_aucs(cfg))
    bar = tqdm(ds.lockstep(), total=ds.max_batches(), desc="eval", unit="batch", leave=False, disable=not env.is_main,
               dynamic_ncols=True)
    for batch in bar:
        batch = batch.to(env.device, non_blocking=True)
        _, (_, logits, labels) = model(batch)
        groups = group_ids(batch, cfg.data.group_by)
        metrics.update(logits, labels, batch.weights, groups)
        if rows is not None:
            rows.add(split, batch.row_index, groups, logits, labels, batch.weights > 0)
    model.train(was_training)
    return metrics.compute()


@torch.no_grad()
def average_buffers(model: torch.nn.Module) -> None:
    """Average floating-point buffers (Dice / BatchNorm running statistics) over ranks.

    DDP here does not broadcast buffers, so each rank keeps statistics of its own rows; eval and
    checkpoints must see one model, whatever the world size."""
    world = dist.get_world_size()
    if world == 1:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf /= world


def _mark(name: str) -> AbstractContextManager:
    """The plain loop's profiler ranges, named as the pipeline's (`## forward ##`, ...) so that profiles of
    either loop split alike; a no-op unless a profiler runs (a range costs ~10 us a step, five a step)."""
    return record_function(name) if torch._C._autograd._profiler_enabled() else nullcontext()


def pipelined(train: TrainConfig, env: DistEnv) -> bool:
    """Whether training runs through TrainPipelineSparseDist (`train.pipeline`; null decides here).

    The pipeline overlaps the next batch's host-to-device copy and input all-to-all with this step's
    compute: a gain on a GPU (CUDA streams) and across ranks (the collective runs while the model
    computes). One CPU rank has nothing to overlap: there the plain loop is 15-20% faster per step
    (its per-step finite check is a host read of a CPU tensor, free there). `nan_policy: skip`
    needs the plain loop's per-step decision."""
    if train.nan_policy == "skip":
        return False
    if train.pipeline is not None:
        return train.pipeline
    return env.device.type != "cpu" or env.world_size > 1


class _Feed:
    """Training batches, remembering the rows of each batch in flight (NaN reports, row logs).

    `first_step` is the step the first batch will be; fault injection poisons by step."""

    def __init__(self, it: Iterator[Batch], first_step: int, rank: int) -> None:
        self.in_flight: deque[Rows] = deque()
        self.it, self.step, self.rank = it, first_step, rank

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> Batch:
        batch = next(self.it)
        if faults.poison_if(self.step, self.rank):
            batch.dense = torch.full_like(batch.dense, float("nan"))
        self.step += 1
        self.in_flight.append(Rows(batch.row_index, batch.weights))
        return batch


class Trainer:
    def __init__(self, cfg: ExperimentConfig, env: DistEnv, run_dir: str | Path, plan=None) -> None:  # noqa: ANN001
        self.cfg, self.env, self.run_dir = cfg, env, Path(run_dir)
        spec = ranking_spec(cfg, train_id_counts(cfg))
        self.model = shard_model(spec, env, plan)
        if cfg.train.compile:
            compile_over_arch(self.model)
        self.optimizer = build_optimizer(self.model, spec)
        self.train_ds = open_split(cfg, cfg.data.train_split, env, train=True)
        self.eval_ds = {s: open_split(cfg, s, env, train=False) for s in cfg.data.eval_splits}
        self.step, self.epoch, self.batch_in_epoch, self.eval_step = 0, 0, 0, -1
        self.eval_rows = RankingRows(cfg.model.tasks)
        self.eval_pending, self.samples, self.train_seconds, self.clock = False, 0, 0.0, Stopwatch()  # resume()
        self.pipeline: TrainPipelineSparseDist | None = None
        self.row_log = None  # train.log_rows: per-rank JSON lines of the rows each step consumed
        if cfg.train.log_rows:
            (self.run_dir / "rows").mkdir(parents=True, exist_ok=True)
            self.row_log = open(self.run_dir / "rows" / f"rank-{env.rank}.jsonl", "a", buffering=1)  # noqa: SIM115
        self._writer: SummaryWriter | None = None
        self.run = Run(run_dir, env, spec, to_dict(cfg), cfg.source or "the config")

    @property
    def writer(self) -> SummaryWriter:
        """TensorBoard (rank 0), opened on first use; a resumed run drops the events after its checkpoint."""
        if self._writer is None:
            self._writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.run.saved_step
                                         if self.run.saved_step >= 0 else None)
        return self._writer

    # ---- checkpoints ------------------------------------------------------------------------
    def save(self, eval_pending: bool = False) -> Path:
        """`eval_pending`: an eval of this step runs right after the save (a resume redoes it)."""
        average_buffers(self.model)
        self.train_seconds = self.clock.seconds  # throughput.json: the training time up to the last checkpoint
        state = {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "tasks": self.cfg.model.tasks,
                 "eval_pending": eval_pending, "train_seconds": self.train_seconds, "samples": self.samples}
        return self.run.save(self.step, self.model, self.optimizer, state, self.cfg.train.keep_checkpoints)

    def resume(self, ckpt: Path) -> None:
        state = self.run.load(ckpt, self.model, self.optimizer)
        if state["world_size"] != self.env.world_size and state["batch_in_epoch"]:
            log.warning("resuming mid-epoch on %d ranks from a %d-rank run: the rest of the epoch is re-cut",
                        self.env.world_size, state["world_size"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.eval_pending, self.samples = state.get("eval_pending", False), state.get("samples", 0)
        self.train_seconds = state.get("train_seconds", 0.0)
        self.clock = Stopwatch(self.train_seconds)

    # ---- evaluation -------------------------------------------------------------------------
    def run_eval(self) -> dict[str, dict[str, float]]:
        faults.kill_if("eval", self.step, self.env.rank)
        average_buffers(self.model)
        if self.pipeline is not None:  # mid-epoch: the pipeline owns the sharded forwards until detached
            self.pipeline.detach()
        self.eval_rows = RankingRows(self.cfg.model.tasks)  # the rows of the latest eval: metrics.json's
        results = {split: evaluate(self.model, ds, self.cfg, self.env, self.eval_rows, split)
                   for split, ds in self.eval_ds.items()}
        self.eval_step, self.eval_pending = self.step, False
        if self.pipeline is not None:
            self.pipeline.attach(self.model)
        if self.env.is_main:
            for split, values in results.items():
                for key, value in values.items():
                    self.writer.add_scalar(f"{split}/{key}", value, self.step)
                log.info("step %d %s: %s", self.step, split,
                         " ".join(f"{k}={v:.4f}" for k, v in values.items() if k.endswith(("auc", "logloss"))))
        self.run.append_history({"step": self.step, **results})
        return results

    # ---- training ---------------------------------------------------------------------------
    def _steps(self, feed: _Feed) -> Iterator[torch.Tensor]:
        """One loss per optimizer step, through the pipeline or the plain loop (`pipelined`)."""
        if pipelined(self.cfg.train, self.env):
            self.pipeline = TrainPipelineSparseDist(self.model, self.optimizer, self.env.device)
            while True:
                try:  # progress() runs forward, backward and step; it returns the model's outputs
                    loss, _, _ = self.pipeline.progress(feed)
                except StopIteration:
                    self.pipeline.detach()  # restore the sharded modules' own forward for eval
                    self.pipeline = None
                    return
                yield loss
        while True:  # the plain loop decides on every step, before the update (nan_policy)
            with _mark("## next_batch ##"):
                batch = next(feed, None)
            if batch is None:
                return
            with _mark("## forward ##"):
                loss, _ = self.model(batch.to(self.env.device, non_blocking=True))
            if not all_finite(loss):  # all ranks decide alike
                if self.cfg.train.nan_policy == "skip":
                    log.warning("step %d: non-finite loss, batch skipped", self.step + 1)
                    feed.in_flight.popleft()
                    self.batch_in_epoch += 1  # the batch is consumed: a resume must not see it again
                    continue
                self.force_sync = True  # fit() stops on it before any update is applied
                yield torch.tensor(float("nan"))
                continue
            with _mark("## zero_grad ##"):
                self.optimizer.zero_grad()
            with _mark("## backward ##"):
                loss.backward()
            with _mark("## optimizer ##"):
                self.optimizer.step()
            yield loss.detach()

    def _sync(self, window: StepWindow, stop: StopSignal | None) -> float:
        self.force_sync = False
        return self.run.sync(window, stop, self.step, self.save)

    def fit(self, stop: StopSignal | None = None) -> dict[str, dict[str, float]]:
        tc, main = self.cfg.train, self.env.is_main
        per_epoch = self.train_ds.max_batches()
        total = tc.epochs * per_epoch if tc.max_steps <= 0 else min(tc.max_steps, tc.epochs * per_epoch)
        bar = tqdm(total=total, initial=self.step, disable=not main, unit="step", dynamic_ncols=True)
        rows_per_step = self.train_ds.batch_size * self.env.world_size
        results: dict[str, dict[str, float]] = {}
        window, self.force_sync = StepWindow(), False
        self.model.train()
        if self.eval_pending:  # resumed from a checkpoint saved right before its eval
            results = self.run_eval()
        self.clock.start_now()
        while self.epoch < tc.epochs and self.step < total:
            feed = _Feed(self.train_ds.lockstep(self.epoch, self.batch_in_epoch), self.step + 1, self.env.rank)
            n0, t0 = self.step, self.clock.seconds
            for loss in self._steps(feed):
                rows = feed.in_flight.popleft()
                self.step, self.batch_in_epoch, self.samples = self.step + 1, self.batch_in_epoch + 1, \
                    self.samples + rows_per_step
                window.add(loss, self.step, self.epoch, self.batch_in_epoch, rows)
                if self.row_log is not None:  # an audit mode: one host read per step is fine here
                    entry = {"step": self.step, "loss": float(loss), "rows": rows.real().tolist()}
                    self.row_log.write(json.dumps(entry) + "\n")
                faults.kill_if("kill", self.step, self.env.rank)
                bar.update(1)
                # the last step's eval waits for the final save (below, or at the epoch's end)
                last, logs = self.step >= total, self.step % tc.log_every == 0
                evals = bool(tc.eval_every) and self.step % tc.eval_every == 0 and not last
                saves = bool(tc.checkpoint_every) and self.step % tc.checkpoint_every == 0 or \
                    last and self.batch_in_epoch < per_epoch
                if logs or evals or saves or last or self.force_sync:
                    mean = self._sync(window, stop)
                    if logs and main:
                        rate = (self.step - n0) * rows_per_step / max(self.clock.seconds - t0, 1e-9)
                        bar.set_postfix(loss=f"{mean:.4f}", samples_s=f"{rate:,.0f}")
                        self.writer.add_scalar("train/loss", mean, self.step)
                        self.writer.add_scalar("train/samples_per_s", rate, self.step)
                paused = self.clock.pause()
                if saves:  # before the eval: a failing eval loses nothing
                    self.save(eval_pending=evals)
                if evals:
                    results = self.run_eval()
                self.clock.resume(paused)
                if self.step >= total and self.batch_in_epoch < per_epoch:  # max_steps inside an epoch
                    break
            else:
                self._sync(window, stop)
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                paused = self.clock.pause()
                if not tc.checkpoint_every and self.run.saved_step != self.step:
                    self.save(eval_pending=not tc.eval_every)
                if not tc.eval_every:
                    results = self.run_eval()
                self.clock.resume(paused)
        bar.close()
        if self.run.saved_step != self.step:
            self.save(eval_pending=self.eval_step != self.step)
        if self.eval_step != self.step:
            results = self.run_eval()
        self.eval_rows.write(self.run.dir, self.env.is_main)  # per-row results, for `trec-rank compare`
        self.run.write_json("metrics.json", results)
        self.run.write_json("throughput.json", {
            "steps": self.step, "train_seconds": self.train_seconds, "world_size": self.env.world_size,
            "samples_per_s": self.samples / self.train_seconds if self.train_seconds > 0 else 0.0}, sort_keys=False)
        if self._writer is not None:
            self._writer.close()
        return results
