"""DIN encoder under a multi-task model on 2 ranks: MMoE with `encoder.attention` (rating-aware keys,
mini-batch-aware L2) trains both funnel tasks with the item table sharded row-wise across the ranks
(gloo, the real CLI under torchrun)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from torch.distributed.checkpoint import FileSystemReader

from tests.helpers import ROOT, run_cli
from trec_rank.config.experiment import read_config


def test_din_mmoe_trains_on_two_ranks_with_sharded_tables(ml100k_dir: Path, tmp_path: Path) -> None:
    cfg = read_config(ROOT / "configs/ml100k_esmm_din.yaml")  # schema file inlined: the copy is written elsewhere
    encoder = cfg["model"]["params"]["encoder"]
    assert encoder["attention"] and encoder["l2"]["weight"] > 0
    cfg["model"] = {"name": "mmoe", "tasks": ["watch", "like"],
                    "params": {"experts": 2, "expert_hidden": [32], "tower_hidden": [16], "encoder": encoder}}
    cfg["data"].update(path=str(ml100k_dir / "funnel"), eval_splits=["valid"], validate="schema")
    cfg["train"] = {"seed": 0, "max_steps": 40, "optim": {"sparse_lr": 0.2, "dense_lr": 0.003}}
    cfg["sharding"] = {"constraints": {"item": {"sharding_types": ["row_wise"]}}}
    path = tmp_path / "din_mmoe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    run_cli("train", str(path), "--run-dir", str(run_dir), nproc=2)

    metrics = json.loads((run_dir / "metrics.json").read_text())["valid"]
    assert metrics["watch/auc"] > 0.6 and metrics["like/auc"] > 0.6
    ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    meta = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    item = [v for k, v in meta.items() if k.endswith("ec.embeddings.item.weight")]
    assert len(item) == 1 and len(item[0].chunks) == 2  # one row-wise shard per rank
    chunks = sorted(item[0].chunks, key=lambda c: c.offsets[0])
    assert chunks[0].offsets[0] == 0 and chunks[1].offsets[0] == chunks[0].sizes[0] > 0
    assert chunks[0].sizes[0] + chunks[1].sizes[0] >= 1683  # row-wise shards may pad the last one
