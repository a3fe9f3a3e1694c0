"""The training loop every model uses: pipelined sparse-dist steps, periodic eval, checkpoints.

Ranks run in lockstep (the sharded embeddings exchange data every step), so every iterator here
yields the same number of batches on every rank: the datasets pad short ranks with zero-weight
batches, and stop decisions (NaN, max_steps) are taken from values all ranks agree on.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from tqdm import tqdm

from trec_rank.compare.ranking_rows import write_ranking_rows
from trec_rank.config.experiment import ExperimentConfig
from trec_rank.config.typed import to_dict
from trec_rank.data.batch import Batch
from trec_rank.data.dataset import ParquetDataset
from trec_rank.parallel.env import DistEnv
from trec_rank.train import checkpoint, faults
from trec_rank.train.build import build_optimizer, build_train_model, group_ids, open_split, schema_fingerprint
from trec_rank.train.metrics import EvalMetrics, subset_aucs

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """Training stopped on a NaN/inf loss; the message names the step and the batch rows."""


@torch.no_grad()
def evaluate(model: torch.nn.Module, ds: ParquetDataset, cfg: ExperimentConfig, env: DistEnv) -> dict[str, float]:
    was_training = model.training
    model.eval()
    metrics = EvalMetrics(cfg.model.tasks, ds.batch_size, env.world_size, env.rank, env.device,
                          window_rows=ds.num_rows, subsets=subset_aucs(cfg))
    for batch in ds.lockstep():
        batch = batch.to(env.device, non_blocking=True)
        _, (_, logits, labels) = model(batch)
        metrics.update(logits, labels, batch.weights, group_ids(batch, cfg.data.group_by))
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


def _all_true(flag: bool, device: torch.device) -> bool:
    if dist.get_world_size() == 1:  # nothing to agree with: skip the per-step collective
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


class _Feed:
    """Training batches, remembering the rows of each batch in flight (NaN reports, row logs).

    `first_step` is the step the first batch will be; fault injection poisons by step."""

    def __init__(self, it: Iterator[Batch], first_step: int, rank: int) -> None:
        self.it, self.in_flight, self.step, self.rank = it, deque(), first_step, rank

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> Batch:
        batch = next(self.it)
        if faults.poison_if(self.step, self.rank):
            batch.dense = torch.full_like(batch.dense, float("nan"))
        self.step += 1
        self.in_flight.append(batch.row_index[batch.weights > 0])
        return batch


class Trainer:
    def __init__(self, cfg: ExperimentConfig, env: DistEnv, run_dir: str | Path, plan=None) -> None:  # noqa: ANN001
        self.cfg, self.env, self.run_dir = cfg, env, Path(run_dir)
        self.model = build_train_model(cfg, env, plan)
        self.optimizer = build_optimizer(self.model, cfg.train.optim)
        self.train_ds = open_split(cfg, cfg.data.train_split, env, train=True)
        self.eval_ds = {s: open_split(cfg, s, env, train=False) for s in cfg.data.eval_splits}
        self.step, self.epoch, self.batch_in_epoch, self.saved_step, self.eval_step = 0, 0, 0, -1, -1
        self.pipeline: TrainPipelineSparseDist | None = None
        self.row_log = None  # train.log_rows: per-rank JSON lines of the rows each step consumed
        if cfg.train.log_rows:
            (self.run_dir / "rows").mkdir(parents=True, exist_ok=True)
            self.row_log = open(self.run_dir / "rows" / f"rank-{env.rank}.jsonl", "a", buffering=1)  # noqa: SIM115
        self.writer = SummaryWriter(str(self.run_dir / "tb")) if env.is_main else None
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))

    # ---- checkpoints ------------------------------------------------------------------------
    def save(self) -> Path:
        average_buffers(self.model)
        state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "world_size": self.env.world_size, "fingerprint": schema_fingerprint(self.cfg),
                 "tasks": self.cfg.model.tasks, "config": to_dict(self.cfg)}
        self.saved_step = self.step
        return checkpoint.save(self.run_dir / "checkpoints", self.step, self.model, self.optimizer, state,
                               self.cfg.train.keep_checkpoints)

    def _check(self, ckpt: Path) -> dict:
        state = checkpoint.read_state(ckpt)
        if state["fingerprint"] != schema_fingerprint(self.cfg):
            raise ValueError(f"{ckpt}: checkpoint was trained with another schema/model "
                             f"(fingerprint {state['fingerprint']} != {schema_fingerprint(self.cfg)})")
        return state

    def init_from(self, ckpt: Path) -> None:
        """Warm start: the checkpoint's weights, fresh optimizer state, step 0 (fine-tuning, A/B inits)."""
        self._check(ckpt)
        checkpoint.load(ckpt, self.model, None)
        log.info("initialised weights from %s", ckpt)

    def resume(self, ckpt: Path) -> None:
        state = self._check(ckpt)
        if state["world_size"] != self.env.world_size and state["batch_in_epoch"]:
            log.warning("resuming mid-epoch on %d ranks from a %d-rank run: the rest of the epoch is re-cut",
                        self.env.world_size, state["world_size"])
        checkpoint.load(ckpt, self.model, self.optimizer)
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        log.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt, self.step, self.epoch, self.batch_in_epoch)

    # ---- evaluation -------------------------------------------------------------------------
    def run_eval(self) -> dict[str, dict[str, float]]:
        average_buffers(self.model)
        if self.pipeline is not None:  # mid-epoch: the pipeline owns the sharded forwards until detached
            self.pipeline.detach()
        results = {split: evaluate(self.model, ds, self.cfg, self.env) for split, ds in self.eval_ds.items()}
        self.eval_step = self.step
        if self.pipeline is not None:
            self.pipeline.attach(self.model)
        if self.env.is_main:
            for split, values in results.items():
                for key, value in values.items():
                    self.writer.add_scalar(f"{split}/{key}", value, self.step)
                log.info("step %d %s: %s", self.step, split,
                         " ".join(f"{k}={v:.4f}" for k, v in values.items() if k.endswith(("auc", "logloss"))))
            with open(self.run_dir / "metrics_history.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **results}) + "\n")
        return results

    # ---- training ---------------------------------------------------------------------------
    def _steps(self, feed: _Feed) -> Iterator[torch.Tensor]:
        """One loss per optimizer step; the pipeline (default) overlaps input dist with compute."""
        if self.cfg.train.pipeline and self.cfg.train.nan_policy == "stop":
            self.pipeline = TrainPipelineSparseDist(self.model, self.optimizer, self.env.device)
            while True:
                try:  # progress() runs forward, backward and step; it returns the model's outputs
                    loss, _, _ = self.pipeline.progress(feed)
                except StopIteration:
                    self.pipeline.detach()  # restore the sharded modules' own forward for eval
                    self.pipeline = None
                    return
                yield loss
        for batch in feed:
            batch = batch.to(self.env.device, non_blocking=True)
            loss, _ = self.model(batch)
            if not _all_true(bool(torch.isfinite(loss)), self.env.device):  # all ranks decide alike
                if self.cfg.train.nan_policy == "skip":
                    log.warning("step %d: non-finite loss, batch skipped", self.step + 1)
                    feed.in_flight.popleft()
                    self.batch_in_epoch += 1  # the batch is consumed: a resume must not see it again
                    continue
                yield torch.tensor(float("nan"))  # fit() stops on it before any update is applied
                continue
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            yield loss.detach()

    def fit(self) -> dict[str, dict[str, float]]:
        tc, main = self.cfg.train, self.env.is_main
        per_epoch = self.train_ds.max_batches()
        total = tc.epochs * per_epoch if tc.max_steps <= 0 else min(tc.max_steps, tc.epochs * per_epoch)
        bar = tqdm(total=total, initial=self.step, disable=not main, unit="step", dynamic_ncols=True)
        rows_per_step = self.train_ds.batch_size * self.env.world_size
        results: dict[str, dict[str, float]] = {}
        first_step, train_s = self.step, 0.0
        self.model.train()
        while self.epoch < tc.epochs and self.step < total:
            feed = _Feed(self.train_ds.lockstep(self.epoch, self.batch_in_epoch), self.step + 1, self.env.rank)
            t0, n0 = time.perf_counter(), self.step
            t_eval = 0.0  # time spent in evals and saves inside this epoch, not training
            for loss in self._steps(feed):
                rows = feed.in_flight.popleft()
                self.step += 1
                self.batch_in_epoch += 1
                value = float(loss)
                if not _all_true(math.isfinite(value), self.env.device):
                    span = f"{int(rows.min())}..{int(rows.max())}" if rows.numel() else "padding"
                    raise NonFiniteLoss(f"non-finite loss at step {self.step} (epoch {self.epoch}, batch "
                                        f"{self.batch_in_epoch}, dataset rows {span} on rank {self.env.rank}); "
                                        f"last good checkpoint kept in {self.run_dir / 'checkpoints'}")
                if self.row_log is not None:
                    entry = {"step": self.step, "loss": value, "rows": rows.tolist()}
                    self.row_log.write(json.dumps(entry) + "\n")
                faults.kill_if("kill", self.step, self.env.rank)
                if main and self.step % tc.log_every == 0:
                    rate = (self.step - n0) * rows_per_step / max(time.perf_counter() - t0 - t_eval, 1e-9)
                    bar.set_postfix(loss=f"{value:.4f}", samples_s=f"{rate:,.0f}")
                    self.writer.add_scalar("train/loss", value, self.step)
                    self.writer.add_scalar("train/samples_per_s", rate, self.step)
                bar.update(1)
                t1 = time.perf_counter()
                if tc.eval_every and self.step % tc.eval_every == 0:
                    results = self.run_eval()
                if tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                    self.save()
                t_eval += time.perf_counter() - t1
                if self.step >= total and self.batch_in_epoch < per_epoch:  # max_steps inside an epoch
                    break
            else:
                train_s += time.perf_counter() - t0 - t_eval
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                if not tc.eval_every:
                    results = self.run_eval()
                if not tc.checkpoint_every:
                    self.save()
            if self.step >= total and self.batch_in_epoch:  # stopped mid-epoch by max_steps
                train_s += time.perf_counter() - t0 - t_eval
        bar.close()
        if self.eval_step != self.step:
            results = self.run_eval()
        if self.saved_step != self.step:
            self.save()
        if self.pipeline is not None:  # stopped mid-epoch by max_steps: the pipeline still owns the sharded forwards
            self.pipeline.detach()
        write_ranking_rows(self.model, self.eval_ds, self.cfg, self.env.device, self.run_dir, main)  # compare
        if main:
            (self.run_dir / "metrics.json").write_text(json.dumps(results, indent=1, sort_keys=True))
            steps = self.step - first_step
            speed = {"steps": steps, "train_seconds": train_s, "world_size": self.env.world_size,
                     "samples_per_s": steps * rows_per_step / train_s if train_s > 0 else 0.0}
            (self.run_dir / "throughput.json").write_text(json.dumps(speed, indent=1))
            self.writer.close()
        return results
