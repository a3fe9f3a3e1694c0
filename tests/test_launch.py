"""TorchX components: a real local_cwd job on 2 ranks, and cluster dry runs (kubernetes, slurm)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torchx.runner import get_runner

ROOT = Path(__file__).resolve().parents[1]
COMPONENT = "launch/components.py:train"


@pytest.mark.parametrize("nnodes,nproc", [(1, 2), (2, 1)])  # 2 ranks on one node; 2 simulated nodes
def test_local_cwd_job_trains_on_two_ranks(ml100k_dir: Path, tmp_path: Path, nnodes: int, nproc: int) -> None:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONWARNINGS": "ignore"}
    cmd = [str(bin_dir / "torchx"), "run", "-s", "local_cwd", COMPONENT, "--run_dir", str(tmp_path / "run"),
           "--nnodes", str(nnodes), "--nproc_per_node", str(nproc), f"data.path={ml100k_dir}/ranking",
           "train.max_steps=10"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "SUCCEEDED" in proc.stderr + proc.stdout, proc.stderr[-4000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["like/auc"] > 0.55


@pytest.mark.parametrize("scheduler,cfg", [("kubernetes", {"queue": "default", "namespace": "recsys"}),
                                           ("slurm", {"partition": "gpu"})])
def test_cluster_dry_runs(scheduler: str, cfg: dict) -> None:
    args = ["--nnodes", "4", "--nproc_per_node", "8", "--gpu", "8", "--image", "trec-rank:0.1.0",
            "--max_retries", "3", "train.epochs=2"]
    with get_runner() as runner:
        info = runner.dryrun_component(COMPONENT, args, scheduler=scheduler, cfg=cfg, workspace=None)
    text = " ".join(str(info).split())  # kubernetes YAML folds long command lines
    assert "--nnodes 4 --nproc_per_node 8" in text
    assert "-m trec_rank.cli train configs/ml100k_base.yaml --run-dir runs/train --resume" in text
    assert "train.epochs=2" in text
    role = info._app.roles[0]
    assert role.resource.gpu == 8 and role.max_retries == 3 and role.image == "trec-rank:0.1.0"
