"""Retrieval training: sharded item table + dense encoder, pipelined steps, per-epoch full-corpus eval,
early stopping on validation, DCP checkpoints and resume.

Optimizers: the item table's optimizer is fused into its backward (fbgemm); on CPU only
rowwise_adagrad/adagrad/sgd exist there, so the default is row-wise Adagrad for the table and
AdamW (betas 0.9/0.98, the reference's) for the dense encoder. The reference uses Adam(W) for
everything; on GPU `train.optim.sparse: adam` restores that.

Every rank runs the same number of steps (the readers pad with zero-weight batches) and every
stop decision uses values all ranks share (all-reduced losses and metrics), so no rank waits in
a collective another rank skipped. Test metrics are computed at every evaluation but never drive
a decision: the run reports the test metrics of the epoch with the best validation metric.

Outputs in RUN_DIR: metrics.json `{"valid": {...}, "test": {...}}` (the best validation epoch's
metrics, the same format as ranking runs), best.json (which epoch/step that was, and its
checkpoint), metrics_history.jsonl (every evaluation), checkpoints/ (the latest
`keep_checkpoints`, rotated) and best/ (the best validation epoch's checkpoint, saved when it is
reached and never removed by the rotation, so it can be evaluated or scored after the run).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from trec_rank.compare.rows import write_retrieval_rows
from trec_rank.config.typed import to_dict
from trec_rank.parallel.env import DistEnv
from trec_rank.parallel.sharding import shard, tag_sparse_optimizer
from trec_rank.retrieval.batch import NegativeSampler, RetrievalBatch, train_batch
from trec_rank.retrieval.config import RetrievalConfig, RetrievalTrain
from trec_rank.retrieval.data import SplitReader, read_sequences
from trec_rank.retrieval.evaluate import evaluate_split
from trec_rank.retrieval.model import build_retrieval_model
from trec_rank.train import checkpoint

log = logging.getLogger(__name__)
EVAL_SPLITS = ("valid", "test")
BEST_DIR = "best"  # RUN_DIR/best/step-N: the best validation epoch's checkpoint


def data_path(cfg: RetrievalConfig) -> Path:
    """data.path as given, or relative to the config file's directory when that is where it exists."""
    path = Path(cfg.data.path)
    source = getattr(cfg, "source", None)
    if not path.is_absolute() and not path.exists() and source:
        path = Path(source).parent / path
    return path


def build_sharded_model(cfg: RetrievalConfig, env: DistEnv) -> DistributedModelParallel:
    torch.manual_seed(cfg.train.seed)  # same dense init on every rank (DDP also broadcasts rank 0's)
    model = build_retrieval_model(cfg, torch.device("meta"))
    tag_sparse_optimizer(model, cfg.train.optim, env.device.type)
    return shard(model, cfg.planning_view(), env.device)


def build_optimizer(dmp: DistributedModelParallel, tc: RetrievalTrain) -> CombinedOptimizer:
    """The table's fused optimizer + one for the dense parameters (tables filtered out: no double update)."""
    o = tc.optim

    def make(params):  # noqa: ANN001, ANN202
        if o.dense == "sgd":
            return torch.optim.SGD(params, lr=o.dense_lr, weight_decay=o.weight_decay)
        cls = torch.optim.AdamW if o.dense == "adamw" else torch.optim.Adam
        return cls(params, lr=o.dense_lr, betas=tuple(tc.adam_betas), eps=o.eps, weight_decay=o.weight_decay)

    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())), make)
    dense.init_state()  # materialise lazy Adam state so a checkpoint can be loaded into it
    return CombinedOptimizer([dmp.fused_optimizer, dense])


class RetrievalTrainer:
    def __init__(self, cfg: RetrievalConfig, env: DistEnv, run_dir: str | Path) -> None:
        self.cfg, self.env, self.run_dir = cfg, env, Path(run_dir)
        d = cfg.data
        seqs = read_sequences(data_path(cfg), d.items_column, d.time_column, cfg.item.num_embeddings,
                              d.action_column, d.num_actions)
        self.corpus = seqs.corpus()
        rank, world = env.rank, env.world_size
        self.train_reader = SplitReader(seqs, "train", cfg, d.batch_size, rank, world, shuffle=True)
        self.eval_readers = {s: SplitReader(seqs, s, cfg, d.eval_batch_size, rank, world, shuffle=False)
                             for s in EVAL_SPLITS}
        self.sampler = NegativeSampler(self.corpus, cfg.loss.num_negatives, cfg.loss.sampler,
                                       cfg.item.num_embeddings, d.seed)
        self.model = build_sharded_model(cfg, env)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.step, self.epoch, self.batch_in_epoch, self.bad_epochs, self.saved_step = 0, 0, 0, 0, -1
        self.best: dict = {}  # {"epoch", "step", "valid", "test"} of the best validation so far
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))

    # ---- checkpoints ------------------------------------------------------------------------
    def save(self) -> Path:
        return self.save_to(self.run_dir / "checkpoints", self.cfg.train.keep_checkpoints)

    def save_to(self, root: Path, keep: int) -> Path:
        state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "bad_epochs": self.bad_epochs, "best": self.best, "world_size": self.env.world_size,
                 "fingerprint": self.cfg.fingerprint(), "kind": "retrieval", "config": to_dict(self.cfg)}
        self.saved_step = self.step
        return checkpoint.save(root, self.step, self.model, self.optimizer, state, keep)

    def save_best(self) -> Path:
        """The best validation epoch's checkpoint, outside checkpoints/ so rotation never removes it."""
        path = self.save_to(self.run_dir / BEST_DIR, keep=1)
        if self.env.is_main:
            best = {"epoch": self.best["epoch"], "step": self.best["step"],
                    "checkpoint": str(path.relative_to(self.run_dir)),
                    "early_stop_metric": self.cfg.eval.early_stop_metric}
            (self.run_dir / "best.json").write_text(json.dumps(best, indent=1, sort_keys=True))
            write_retrieval_rows(self.run_dir, {s: self.best[s] for s in EVAL_SPLITS})  # per-user, for compare
        return path

    def resume(self, ckpt: Path) -> None:
        state = checkpoint.read_state(ckpt)
        if state.get("fingerprint") != self.cfg.fingerprint():
            raise ValueError(f"{ckpt}: checkpoint was trained with another item table/model "
                             f"(fingerprint {state.get('fingerprint')} != {self.cfg.fingerprint()})")
        checkpoint.load(ckpt, self.model, self.optimizer)
        for key in ("step", "epoch", "batch_in_epoch", "bad_epochs", "best"):
            setattr(self, key, state[key])
        self.saved_step = self.step
        log.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt, self.step, self.epoch,
                 self.batch_in_epoch)

    # ---- evaluation -------------------------------------------------------------------------
    def evaluate(self) -> dict[str, dict[str, float]]:
        return {s: evaluate_split(self.model.module, r, self.corpus, self.cfg.eval.ks, self.env.device)
                for s, r in self.eval_readers.items()}

    def _track(self, results: dict[str, dict[str, float]]) -> bool:
        """Early-stopping bookkeeping on the validation metric (identical on all ranks: all-reduced).

        Returns whether this evaluation is the new best."""
        key = self.cfg.eval.early_stop_metric
        improved = not self.best or results["valid"][key] > self.best["valid"][key]
        if improved:
            self.best, self.bad_epochs = {"epoch": self.epoch, "step": self.step, **results}, 0
        else:
            self.bad_epochs += 1
        if self.env.is_main:
            valid, test = results["valid"], results["test"]
            log.info("epoch %d step %d: valid %s=%.4f hr@10=%.4f | test %s=%.4f | best valid %.4f (epoch %d)",
                     self.epoch, self.step, key, valid[key], valid.get("hr@10", math.nan), key, test[key],
                     self.best["valid"][key], self.best["epoch"])
            with open(self.run_dir / "metrics_history.jsonl", "a") as f:
                f.write(json.dumps({"epoch": self.epoch, "step": self.step, **results}) + "\n")
        return improved

    # ---- training ---------------------------------------------------------------------------
    def _batches(self) -> Iterator[RetrievalBatch]:
        for i, window in self.train_reader.batches(self.epoch, self.batch_in_epoch):
            yield train_batch(window, self.sampler, self.epoch, self.env.rank, i)

    def _step_limit_hit(self) -> bool:
        return 0 < self.cfg.train.max_steps <= self.step

    def _train_epoch(self) -> bool:
        """Steps until the epoch ends (True) or max_steps is hit (False)."""
        tc, t0, n0 = self.cfg.train, time.perf_counter(), self.step
        pipeline = TrainPipelineSparseDist(self.model, self.optimizer, self.env.device)
        batches = self._batches()
        try:
            while not self._step_limit_hit():
                try:  # progress() runs forward, backward and both optimizers
                    (loss,) = pipeline.progress(batches)
                except StopIteration:
                    return True
                self.step += 1
                self.batch_in_epoch += 1
                value = loss.detach().clone()
                if dist.is_initialized():
                    dist.all_reduce(value)
                if not math.isfinite(float(value)):
                    raise RuntimeError(f"non-finite loss at step {self.step} (epoch {self.epoch}, batch "
                                       f"{self.batch_in_epoch}); last good checkpoint kept in {self.run_dir}")
                if self.env.is_main and self.step % tc.log_every == 0:
                    rate = (self.step - n0) / max(time.perf_counter() - t0, 1e-9)
                    log.info("step %d loss %.4f (%.2f steps/s)", self.step, float(value) / self.env.world_size,
                             rate)
                if tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                    self.save()
            return False
        finally:
            pipeline.detach()  # restore the sharded modules' own forward for eval

    def _stopped_early(self) -> bool:
        return 0 < self.cfg.train.patience <= self.bad_epochs

    def fit(self) -> dict[str, dict]:
        """Train until epochs, max_steps or early stopping; returns (and writes) the best epoch's metrics."""
        while self.epoch < self.cfg.train.epochs and not self._step_limit_hit() and not self._stopped_early():
            if self._train_epoch():
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            if self._track(self.evaluate()):
                self.save_best()
            self.save()
        if self._stopped_early() and self.env.is_main:
            log.info("early stop: no better valid %s for %d evaluations", self.cfg.eval.early_stop_metric,
                     self.bad_epochs)
        if not self.best:  # resumed a finished run: evaluate what the checkpoint holds
            self._track(self.evaluate())
            self.save_best()
        if self.saved_step != self.step:
            self.save()
        results = {"valid": self.best["valid"], "test": self.best["test"]}
        if self.env.is_main:
            (self.run_dir / "metrics.json").write_text(json.dumps(results, indent=1, sort_keys=True))
        return results
