"""`trec-rank score` on one rank: checks, output preparation on rank 0, model, loop, `_SUCCESS`.

The order carries the guarantees. Every user mistake (checkpoint fingerprint, missing column, an output
directory of another job, a part size that is not whole batches) surfaces before the first part is
written. Rank 0 alone inspects and prepares the output directory and decides the pending parts and the
model kind, then broadcasts them, so all ranks work from one view of the directory even while parts
start appearing. `_SUCCESS` is written by rank 0 only after a collective that every rank enters once
all its parts have been renamed into place.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torchmetrics.functional.classification import binary_auroc

from trec_rank.config.experiment import ExperimentConfig
from trec_rank.config.models import side_bounds
from trec_rank.data.convert import DataError
from trec_rank.data.dataset import ParquetDataset, list_parquet_files, pin_for
from trec_rank.parallel.env import DistEnv, init_distributed, shutdown
from trec_rank.runtime import checkpoint
from trec_rank.runtime.model import ranking_spec
from trec_rank.score import model as scoring_model
from trec_rank.score.loop import PassthroughReader, RankScorer, batches_for
from trec_rank.score.output import (
    JOB_FILE,
    SUCCESS_FILE,
    default_part_rows,
    finalize,
    num_parts,
    prepare,
    read_job,
    read_window,
)


@dataclass
class ScoreRequest:
    config: ExperimentConfig
    checkpoint: str
    input: str
    output: str
    passthrough: list[str] | None  # None: the default join columns
    batch_size: int | None  # None: data.eval_batch_size
    part_rows: int | None  # None: the value of an earlier run, else default_part_rows
    plan: str | None  # sharding plan JSON; implies sharded
    quantize: str | None  # None | "int8"
    sharded: bool


def _from_rank0(env: DistEnv, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 and give every rank its result, or raise its ValueError on every rank."""
    box: list[Any] = [(None, None)]
    if env.is_main:
        try:
            box[0] = (fn(), None)
        except (ValueError, FileNotFoundError) as err:
            box[0] = (None, str(err))
    if env.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise ValueError(error)
    return result


def _footers(files: list[str]) -> tuple[list[pa.Schema], int]:
    """Arrow schema of every file and the total row count, from the Parquet footers only."""
    schemas, rows = [], 0
    for f in files:
        try:
            footer = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{f}: not a readable Parquet file ({err})") from None
        schemas.append(footer.schema_arrow)
        rows += footer.metadata.num_rows
    return schemas, rows


def _passthrough(req: ScoreRequest, files: list[str], schemas: list[pa.Schema]) -> list[str]:
    cfg = req.config
    if req.passthrough is None:
        wanted = [cfg.schema.feature(cfg.data.group_by).column] if cfg.data.group_by else []
        columns = [c for c in dict.fromkeys([*wanted, "user_id", "item_id"]) if all(c in s.names for s in schemas)]
    else:
        columns = list(dict.fromkeys(req.passthrough))
        for c in columns:
            for f, s in zip(files, schemas):
                if c not in s.names:
                    raise ValueError(f"--passthrough: column '{c}' not found in {f}")
    for c in columns:
        if c == "row_index" or c.startswith("p_"):
            raise ValueError(f"--passthrough: '{c}' collides with an output column (row_index, p_<key>)")
    return columns


def _settings(req: ScoreRequest, batch_size: int) -> dict[str, Any]:
    """Rank 0, before the data is opened: part size, passthrough columns, whether labels are read."""
    out = Path(req.output)
    files = list_parquet_files(req.input)
    schemas, rows = _footers(files)
    earlier = read_job(out) if out.is_dir() else None
    part_rows = req.part_rows or (earlier["part_rows"] if earlier else default_part_rows(rows, batch_size))
    if part_rows % batch_size:
        origin = f" (fixed by the first run in {out / JOB_FILE})" if earlier and not req.part_rows else ""
        raise ValueError(f"--part-rows {part_rows}{origin}: must be a multiple of --batch-size {batch_size}")
    labels = [f.column for f in req.config.schema.labels]
    with_labels = bool(req.quantize) and all(c in s.names for s in schemas for c in labels)
    return {"part_rows": part_rows, "passthrough": _passthrough(req, files, schemas), "with_labels": with_labels}


def _job(req: ScoreRequest, ds: ParquetDataset, part_rows: int, passthrough: list[str], ckpt: Path,
         step: int | None) -> dict[str, Any]:
    root = Path(os.path.abspath(req.input))  # not resolve(): symlinked files stay named as listed
    files = [{"file": os.path.relpath(os.path.abspath(f), root) if root.is_dir() else Path(f).name,
              "bytes": Path(f).stat().st_size} for f in ds.files]
    return {"format": 1, "input": {"path": str(root), "rows": ds.num_rows, "files": files},
            "part_rows": part_rows, "checkpoint": {"path": str(ckpt.resolve()), "step": step},
            "fingerprint": ranking_spec(req.config).fingerprint, "passthrough": passthrough, "quantize": req.quantize}


def _plan_work(req: ScoreRequest, env: DistEnv, job: dict[str, Any]) -> dict[str, Any]:
    """Rank 0: record/check the job, list finished parts, choose the model kind."""
    out = Path(req.output)
    sharded = req.sharded or bool(req.plan)
    kind = scoring_model.choose_kind(req.config, env, sharded, req.quantize)  # may refuse: touch nothing yet
    created = read_job(out) is None if out.is_dir() else True
    done, complete = prepare(out, job)
    pending = sorted(set(range(num_parts(job["input"]["rows"], job["part_rows"]))) - set(done))
    if pending and complete:  # a part vanished after success: the output is incomplete again
        (out / SUCCESS_FILE).unlink()
        complete = False
    return {"pending": pending, "complete": complete, "kind": kind, "done": len(done), "created": created}


def _forget_job(req: ScoreRequest) -> None:
    """Rank 0, after a failure: a job record this run made but no part was written under is removed,
    so a corrected rerun (another checkpoint, batch size, ...) is not refused as another job."""
    out = Path(req.output)
    if not any(out.glob("part-*.parquet")):
        (out / JOB_FILE).unlink(missing_ok=True)


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC (ties count half); NaN when the rows hold one class only."""
    y = torch.from_numpy(labels > 0.5)
    if y.all() or not y.any():
        return float("nan")
    return float(binary_auroc(torch.from_numpy(scores.astype(np.float64)), y.long()))


def _auc_change(gathered: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """task -> {fp32, int8, delta, rows} over every rank's scored rows (only when labels were read)."""
    result = {}
    for task in sorted({t for g in gathered for t in g["labels"]}):  # a rank may have had no parts left
        have = [g for g in gathered if task in g["labels"]]
        y = np.concatenate([g["labels"][task] for g in have])
        p8 = np.concatenate([g["scores"][task] for g in have])
        p32 = np.concatenate([g["reference"][task] for g in have])
        a32, a8 = _auc(y, p32), _auc(y, p8)
        result[task] = {"fp32": a32, "int8": a8, "delta": a8 - a32, "rows": int(len(y))}
    return result


def _score_rank(req: ScoreRequest, env: DistEnv, ds: ParquetDataset, model: scoring_model.ScoringModel,
                part_rows: int, passthrough: list[str], pending: list[int]) -> list[dict[str, Any]] | None:
    """Score this rank's share of `pending` (a contiguous slice: consecutive parts stream without restarts);
    returns every rank's stats on rank 0 once all ranks are done, None elsewhere."""
    mine = pending[env.rank * len(pending) // env.world_size:(env.rank + 1) * len(pending) // env.world_size]
    pad_to = batches_for(mine, part_rows, ds.num_rows, ds.batch_size)
    if model.lockstep:
        t = torch.tensor([pad_to], device=env.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        pad_to = int(t.item())
    scorer = RankScorer(ds, model, part_rows, Path(req.output), PassthroughReader(ds.row_groups, passthrough),
                        env.device, progress=env.is_main)
    stats = scorer.run(mine, pad_to)
    mine_stats = {"rows": stats.rows, "rss_mb": {k: round(v, 1) for k, v in stats.rss_mb.items()},
                  **{name: {k: np.concatenate(v) for k, v in getattr(stats, name).items()}
                     for name in ("labels", "scores", "reference")}}
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, mine_stats)  # also the barrier: every rank's parts are in place
    return gathered if env.is_main else None


def _already_complete(req: ScoreRequest) -> dict[str, Any]:
    manifest = json.loads((Path(req.output) / SUCCESS_FILE).read_text())
    print(f"score: already complete: rows_in={manifest['input_rows']} rows_out={manifest['output_rows']} "
          f"scored=0 output={req.output}", flush=True)
    return manifest


def run(req: ScoreRequest) -> dict[str, Any] | None:
    """Score `req.input` into `req.output`; returns the `_SUCCESS` manifest on rank 0, None elsewhere."""
    t_start = time.perf_counter()
    cfg = req.config
    batch_size = req.batch_size or cfg.data.eval_batch_size
    if batch_size < 1 or (req.part_rows is not None and req.part_rows < 1):
        raise ValueError("--batch-size and --part-rows must be >= 1")
    ckpt = checkpoint.resolve(req.checkpoint)
    spec = ranking_spec(cfg)
    state = checkpoint.check(ckpt, spec.fingerprint, cfg.source or "the config")
    env = init_distributed(cfg.sharding.device)
    try:
        plan = None
        if req.plan:  # checked on every rank before anything is written; a plan means sharded scoring
            from trec_rank.plan.io import load_plan

            plan = load_plan(req.plan, spec, env.world_size, env.local_world_size, env.device.type)
        settings = _from_rank0(env, lambda: _settings(req, batch_size))
        part_rows = settings["part_rows"]
        ds = ParquetDataset(req.input, cfg.schema, batch_size, shuffle=False, drop_last=False,
                            shuffle_buffer=read_window(part_rows, batch_size), num_workers=cfg.data.num_workers,
                            with_labels=settings["with_labels"], validate=cfg.data.validate,
                            side_bounds=side_bounds(cfg.model.typed_params), pin_memory=pin_for(env.device))
        job = _job(req, ds, part_rows, settings["passthrough"], ckpt, state.get("step"))
        work = _from_rank0(env, lambda: _plan_work(req, env, job))
        if work["complete"]:
            return _already_complete(req) if env.is_main else None
        try:
            model = scoring_model.load(cfg, env, ckpt, work["kind"], plan, keep_reference=settings["with_labels"])
            dist.barrier()  # time the scoring itself, from a common start
            t_loop = time.perf_counter()
            gathered = _score_rank(req, env, ds, model, part_rows, settings["passthrough"], work["pending"])
        except BaseException:
            if env.is_main and work["created"]:
                _forget_job(req)
            raise
        if gathered is None:
            return None
        seconds, scored = time.perf_counter() - t_loop, sum(g["rows"] for g in gathered)
        run_stats = {"world_size": env.world_size, "model": model.kind, "parts_done_before": work["done"],
                     "scored_rows": scored, "seconds": round(seconds, 3),
                     "rows_per_s": round(scored / max(seconds, 1e-9), 1),
                     "wall_seconds": round(time.perf_counter() - t_start, 3), "rss_mb": [g["rss_mb"] for g in gathered]}
        if model.reference is not None and settings["with_labels"] and scored:
            run_stats["auc"] = _auc_change(gathered)
        manifest = finalize(Path(req.output), job, run_stats)
        _print_summary(manifest, run_stats, req.output)
        return manifest
    finally:
        shutdown()


def _print_summary(manifest: dict[str, Any], run_stats: dict[str, Any], output: str) -> None:
    for task, a in run_stats.get("auc", {}).items():
        print(f"score: int8 vs fp32 on {a['rows']} scored rows: {task}/auc {a['fp32']:.5f} -> {a['int8']:.5f} "
              f"(dAUC {a['delta']:+.5f})")
    print(f"score: rows_in={manifest['input_rows']} rows_out={manifest['output_rows']} "
          f"scored={run_stats['scored_rows']} seconds={run_stats['seconds']:.2f} "
          f"rows_per_s={run_stats['rows_per_s']:.0f} ranks={run_stats['world_size']} model={run_stats['model']} "
          f"output={output}", flush=True)

