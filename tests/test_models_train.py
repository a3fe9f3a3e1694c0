"""Every ranking model trains end to end through the real CLI (short runs) and learns (AUC > 0.6).

One CLI run has a fixed cost of ~13-20 s on 2 cores (imports, planner, DMP, eval, checkpoint) that
dwarfs its few training steps, so the one-process runs are launched together, two at a time (each
is a single-threaded process), and every run evaluates one split without the full value scan.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import run_cli

FAST = ("data.eval_splits=[valid]", "data.validate=schema")
TOWERS = [("adult_shared_bottom", "shared_bottom"), ("adult_mmoe", "moe"), ("adult_mmoe", "mmoe"),
          ("adult_cgc", "cgc"), ("adult_ple", "ple")]


def train(config: str, run_dir: Path, data: Path, *sets: str, nproc: int = 1) -> dict:
    args = ["train", f"configs/{config}.yaml", "--run-dir", str(run_dir), "--set", f"data.path={data}"]
    for s in (*FAST, *sets):
        args += ["--set", s]
    run_cli(*args, nproc=nproc)
    return json.loads((run_dir / "metrics.json").read_text())["valid"]


@pytest.fixture(scope="module")
def one_process_runs(ml100k_dir: Path, adult_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """model name -> valid metrics of its one-process CLI run."""
    jobs = {
        "din": ("ml100k_din_feedback", ml100k_dir / "ranking", "train.max_steps=50"),
        "esmm": ("ml100k_esmm", ml100k_dir / "funnel", "train.max_steps=100", "train.optim.sparse_lr=0.2",
                 "train.optim.dense_lr=0.003"),
        **{name: (config, adult_dir / "adult", f"model.name={name}", "train.max_steps=30") for config, name in TOWERS},
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(train, config, tmp_path_factory.mktemp(name), data, *sets)
                   for name, (config, data, *sets) in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def test_din_with_feedback_and_l2_trains(one_process_runs: dict, ml100k_dir: Path) -> None:
    metrics = one_process_runs["din"]
    assert metrics["like/auc"] > 0.6 and metrics["like/gauc"] > 0.52
    assert (ml100k_dir / "ranking" / "train" / "_id_counts.json").is_file()  # n_j cached next to the data


def test_din_trains_on_two_ranks(ml100k_dir: Path, tmp_path: Path) -> None:
    metrics = train("ml100k_din", tmp_path, ml100k_dir / "ranking", "train.max_steps=30", nproc=2)
    assert metrics["like/auc"] > 0.6


@pytest.mark.parametrize("name", [name for _, name in TOWERS])
def test_tower_models_train_both_tasks(one_process_runs: dict, name: str) -> None:
    metrics = one_process_runs[name]
    assert metrics["income/auc"] > 0.6 and metrics["never_married/auc"] > 0.6


def test_esmm_trains_on_the_funnel(one_process_runs: dict) -> None:
    metrics = one_process_runs["esmm"]
    assert metrics["watch/auc"] > 0.6 and metrics["like/auc"] > 0.6  # like: pCTCVR on all impressions
