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
    """The real MovieLens-100K (never copied into the repo); skips the test when absent.

    Looked for at ``$MOE_MLORA_ML100K``, else ``data/ml-100k`` in the checkout, else a
    ``shared/data/ml-100k`` beside the checkout (the layout of the project's CI machines).
    """
    repo = Path(__file__).resolve().parents[1]
    candidates = [repo / "data/ml-100k", repo.parent / "shared/data/ml-100k"]
    if "MOE_MLORA_ML100K" in os.environ:
        candidates = [Path(os.environ["MOE_MLORA_ML100K"])]
    for root in candidates:
        if (root / "u.data").is_file():
            return root
    looked = ", ".join(str(root) for root in candidates)
    pytest.skip(f"real MovieLens-100K not found at {looked}; set MOE_MLORA_ML100K to its folder")
