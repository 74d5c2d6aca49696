"""Shared fixtures: small generated MovieLens datasets and the real ML-100K when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moe_mlora.data.synthetic_movielens import generate_movielens

SMALL = {"n_users": 400, "n_items": 300, "n_ratings": 12_000}


@pytest.fixture(scope="session")
def ml1m_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset in ML-1M format (users.dat, ratings.dat, movies.dat)."""
    return generate_movielens(tmp_path_factory.mktemp("ml-1m"), "ml-1m", seed=1, **SMALL)


@pytest.fixture(scope="session")
def ml100k_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset in ML-100K format (u.data, u.user, u.item, ...)."""
    return generate_movielens(tmp_path_factory.mktemp("ml-100k"), "ml-100k", seed=2, **SMALL)


@pytest.fixture(scope="session")
def real_ml100k_root() -> Path:
    """The real MovieLens-100K (never copied into the repo); skips the test when absent."""
    default = Path(__file__).resolve().parents[2] / "shared/data/ml-100k"
    root = Path(os.environ.get("MOE_MLORA_ML100K", default))
    if not (root / "u.data").is_file():
        pytest.skip(f"real MovieLens-100K not found at {root}; set MOE_MLORA_ML100K")
    return root
