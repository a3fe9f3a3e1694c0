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

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingPlan

from trec_rank.config.experiment import TableConstraint
from trec_rank.config.schema import FeatureConfig, Schema, TableConfig
from trec_rank.config.typed import to_dict
from trec_rank.parallel.env import DistEnv
from trec_rank.parallel.sharding import ShardingInputs
from trec_rank.retrieval.batch import NegativeSampler, RetrievalBatch, train_batch
from trec_rank.retrieval.config import ITEM_SHARDING, ITEM_TABLE, RetrievalConfig
from trec_rank.retrieval.data import SplitReader, read_sequences
from trec_rank.retrieval.evaluate import evaluate_split
from trec_rank.retrieval.model import build_retrieval_model
from trec_rank.runtime.eval_rows import write_retrieval_rows
from trec_rank.runtime.model import ModelSpec, build_optimizer, shard_model
from trec_rank.runtime.run import Run, StepWindow, StopSignal

log = logging.getLogger(__name__)
EVAL_SPLITS = ("valid", "test")
BEST_DIR = "best"  # RUN_DIR/best/step-N: the best validation epoch's checkpoint


def retrieval_spec(cfg: RetrievalConfig) -> ModelSpec:
    """What planning, sharding and checkpoints see of a retrieval model.

    The item table is read by two features: `seq` (each user's tokens, a sequence of up to
    max_seq_len + 1 ids) and `neg` (the step's sampled candidates), so it lives in an
    EmbeddingCollection and gets the sequence-table constraints (TW/RW/CW, fused, never DP on CPU).
    """
    seq = FeatureConfig("seq", "sequence", table=ITEM_TABLE, max_len=cfg.data.max_seq_len + 1)
    schema = Schema(tables=[TableConfig(ITEM_TABLE, cfg.item.num_embeddings, cfg.item.embedding_dim)],
                    features=[seq, FeatureConfig("neg", "sparse", table=ITEM_TABLE)])
    constraints = dict(cfg.sharding.constraints)
    constraints.setdefault(ITEM_TABLE, TableConstraint(sharding_types=list(ITEM_SHARDING)))
    inputs = ShardingInputs(schema, replace(cfg.sharding, constraints=constraints), cfg.data.batch_size)
    return ModelSpec(build=lambda: build_retrieval_model(cfg, torch.device("meta")), optim=cfg.train.optim,
                     inputs=inputs, fingerprint=cfg.fingerprint(), seed=cfg.train.seed,
                     adam_betas=(cfg.train.adam_betas[0], cfg.train.adam_betas[1]))


class RetrievalTrainer:
    def __init__(self, cfg: RetrievalConfig, env: DistEnv, run_dir: str | Path, plan: ShardingPlan | None = None
                 ) -> None:
        self.cfg, self.env, self.run_dir = cfg, env, Path(run_dir)
        d = cfg.data
        seqs = read_sequences(Path(cfg.data.path), d.items_column, d.time_column, cfg.item.num_embeddings,
                              d.action_column, d.num_actions)
        self.corpus = seqs.corpus()
        rank, world = env.rank, env.world_size
        self.train_reader = SplitReader(seqs, "train", cfg, d.batch_size, rank, world, shuffle=True)
        self.eval_readers = {s: SplitReader(seqs, s, cfg, d.eval_batch_size, rank, world, shuffle=False)
                             for s in EVAL_SPLITS}
        self.sampler = NegativeSampler(self.corpus, cfg.loss.num_negatives, cfg.loss.sampler,
                                       cfg.item.num_embeddings, d.seed)
        spec = retrieval_spec(cfg)
        self.model = shard_model(spec, env, plan)
        self.optimizer = build_optimizer(self.model, spec)
        self.step, self.epoch, self.batch_in_epoch, self.bad_epochs, self.eval_pending = 0, 0, 0, 0, False
        self.best: dict = {}  # {"epoch", "step", "valid", "test"} of the best validation so far
        self.run = Run(run_dir, env, spec, to_dict(cfg), cfg.source or "the config")

    # ---- checkpoints ------------------------------------------------------------------------
    def save(self) -> Path:
        return self.save_to("checkpoints", self.cfg.train.keep_checkpoints)

    def save_to(self, root: str, keep: int) -> Path:
        state = {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "bad_epochs": self.bad_epochs,
                 "best": self.best, "kind": "retrieval", "eval_pending": self.eval_pending}
        return self.run.save(self.step, self.model, self.optimizer, state, keep, root)

    def save_best(self) -> Path:
        """The best validation epoch's checkpoint, outside checkpoints/ so rotation never removes it."""
        path = self.save_to(BEST_DIR, keep=1)
        self.run.write_json("best.json", {"epoch": self.best["epoch"], "step": self.best["step"],
                                          "checkpoint": str(path.relative_to(self.run_dir)),
                                          "early_stop_metric": self.cfg.eval.early_stop_metric})
        if self.env.is_main:  # per-user rows of the reported epoch, for `trec-rank compare`
            write_retrieval_rows(self.run_dir, {s: self.best[s] for s in EVAL_SPLITS})
        return path

    def resume(self, ckpt: Path) -> None:
        state = self.run.load(ckpt, self.model, self.optimizer)
        for key in ("step", "epoch", "batch_in_epoch", "bad_epochs", "best"):
            setattr(self, key, state[key])
        self.eval_pending = state.get("eval_pending", False)

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
        self.run.append_history({"epoch": self.epoch, "step": self.step, **results})
        return improved

    # ---- training ---------------------------------------------------------------------------
    def _batches(self) -> Iterator[RetrievalBatch]:
        for i, window in self.train_reader.batches(self.epoch, self.batch_in_epoch):
            yield train_batch(window, self.sampler, self.epoch, self.env.rank, i)

    def _step_limit_hit(self) -> bool:
        return 0 < self.cfg.train.max_steps <= self.step

    def _train_epoch(self, stop: StopSignal | None) -> bool:
        """Steps until the epoch ends (True) or max_steps is hit (False)."""
        tc, t0, n0 = self.cfg.train, time.perf_counter(), self.step
        pipeline = TrainPipelineSparseDist(self.model, self.optimizer, self.env.device)
        batches, window = self._batches(), StepWindow()
        try:
            while not self._step_limit_hit():
                try:  # progress() runs forward, backward and both optimizers
                    (loss,) = pipeline.progress(batches)
                except StopIteration:
                    pipeline.detach()
                    self.run.sync(window, stop, self.step, self.save)
                    return True
                self.step += 1
                self.batch_in_epoch += 1
                window.add(loss, self.step, self.epoch, self.batch_in_epoch)
                logs = self.step % tc.log_every == 0
                saves = bool(tc.checkpoint_every) and self.step % tc.checkpoint_every == 0
                if logs or saves or self._step_limit_hit():
                    mean = self.run.sync(window, stop, self.step, self.save)
                    if logs and self.env.is_main:
                        rate = (self.step - n0) / max(time.perf_counter() - t0, 1e-9)
                        log.info("step %d loss %.4f (%.2f steps/s)", self.step, mean, rate)
                if saves:
                    self.save()
            return False
        finally:
            pipeline.detach()  # restore the sharded modules' own forward for eval

    def _stopped_early(self) -> bool:
        return 0 < self.cfg.train.patience <= self.bad_epochs

    def _eval(self) -> None:
        self.eval_pending = False
        if self._track(self.evaluate()):
            self.save_best()

    def fit(self, stop: StopSignal | None = None) -> dict[str, dict]:
        """Train until epochs, max_steps or early stopping; returns (and writes) the best epoch's metrics."""
        if self.eval_pending:  # resumed from a checkpoint saved right before its eval
            self._eval()
        while self.epoch < self.cfg.train.epochs and not self._step_limit_hit() and not self._stopped_early():
            if self._train_epoch(stop):
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self.eval_pending = True
            self.save()  # before the eval: a failing eval loses nothing
            self._eval()
        if self._stopped_early() and self.env.is_main:
            log.info("early stop: no better valid %s for %d evaluations", self.cfg.eval.early_stop_metric,
                     self.bad_epochs)
        if not self.best:  # resumed a finished run: evaluate what the checkpoint holds
            self._track(self.evaluate())
            self.save_best()
        if self.run.saved_step != self.step:
            self.save()
        results = {"valid": self.best["valid"], "test": self.best["test"]}
        self.run.write_json("metrics.json", results)
        return results
