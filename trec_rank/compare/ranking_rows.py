"""Per-row ranking results (score, label, group per task) for `trec-rank compare`: one extra eval pass.

The training loop's metrics come from `train.metrics.EvalMetrics`, which keeps only what its
metrics need; this pass re-scores the eval splits with the same model (in eval mode, so the same
scores) and keeps every row with its dataset row_index, so two runs on the same split pair row
by row. It runs once, where metrics.json is written; on ml-100k it costs about one evaluation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trec_rank.compare.rows import ranking_table, write_table


def _gather(local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return {k: np.concatenate([p[k] for p in parts]) for k in local}


@torch.no_grad()
def write_ranking_rows(model: torch.nn.Module, datasets: dict, cfg, device: torch.device,  # noqa: ANN001
                       run_dir: str | Path, is_main: bool) -> Path | None:
    """Score every eval split (`datasets`: split -> ParquetDataset) and write RUN_DIR/eval_rows.parquet.

    Collective: call on every rank (the rows of all ranks are gathered to every rank, rank 0 writes)."""
    from trec_rank.train.build import group_ids

    was_training = model.training
    model.eval()
    splits = {}
    for split, ds in datasets.items():
        cols: dict[str, list] = {"task": [], "row": [], "group": [], "score": [], "label": []}
        for batch in ds.lockstep():
            batch = batch.to(device, non_blocking=True)
            _, (_, logits, labels) = model(batch)
            keep = batch.weights > 0
            rows = batch.row_index[keep].cpu().numpy()
            groups = group_ids(batch, cfg.data.group_by)
            groups = rows if groups is None else groups[keep].cpu().numpy()
            for task in cfg.model.tasks:
                cols["task"].append(np.full(len(rows), task, dtype=object))
                cols["row"].append(rows)
                cols["group"].append(groups)
                cols["score"].append(torch.sigmoid(logits[task][keep].float()).cpu().numpy())
                cols["label"].append(labels[task][keep].float().cpu().numpy())
        local = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
        splits[split] = _gather(local)
    model.train(was_training)
    return write_table(run_dir, ranking_table(splits)) if is_main else None
