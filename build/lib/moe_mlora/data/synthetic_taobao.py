"""Synthetic Taobao CloudTheme files (Tianchi dataset 9716) with planted theme heterogeneity.

The real CloudTheme click data cannot be downloaded here, yet tests, demos and
benchmarks need files in exactly its format, and MoE-MLoRA's claim is about
large data whose domains (themes) really differ. :func:`generate_taobao` writes
the five raw files, streaming every one of them in chunks so memory stays
bounded (a few hundred MB) at tens of millions of clicks:

* ``theme_click_log.csv``: ``user_id,item_id,theme_id,leaf_cate_id``, in
  "time" order (sessions interleaved across themes), with the repeats a real
  log has (the same user clicking the same item of a theme again);
* ``user_embedding.csv`` / ``item_embedding.csv``: ``user_id,emb`` /
  ``item_id,emb``, the vector as one string of ``dim`` space-separated floats;
  a small share of users and items have no vector (``missing_vectors``), as in
  the real files, so the loader's filter has work to do;
* ``theme_item_pool.csv``: ``theme_id,item_id``, each theme's item pool;
* ``user_item_purchase_log.csv``: ``user_id,item_id,leaf_cate_id,time_stamp``,
  a few percent of the clicks (the protocol does not use it).

Generative model (all draws from ``numpy.random.default_rng(seed)``; ``k`` is
the latent dimension, 16):

* **Users** have a latent taste ``z_u ~ N(0, I_k)`` and a lognormal activity.
* **Items** have a latent ``v_i ~ N(0, I_k)``, a long-tailed (Zipf-like)
  popularity and a leaf category.
* **Themes** belong to ``max(2, T // 5)`` clusters. Each theme has a size
  weight (Zipf, exponent 1: a long tail of small themes), an item pool of
  30 to 2000 items drawn by popularity and closeness to a theme centre (pools
  overlap), a click propensity (mean session length 1 + Poisson(0.3 .. 3)) and
  a sharpness ``beta_t``. How a user's taste maps to clicks is theme specific:
  ``score_t(u, i) = (M_t z_u) . v_i / sqrt(k) + w_t . v_i + 0.5 log pop_i`` with
  ``M_t = (1 - h) I + h Q_t``, ``Q_t = 0.8 R_cluster + 0.6 R_theme`` (random
  ``N(0, 1/k)`` matrices, so themes of one cluster are alike and the others
  are not) and ``w_t = h (0.8 w_cluster + 0.6 w_theme)`` an item bias.
* **Heterogeneity** ``h`` in [0, 1] is the knob: at 0 every theme maps tastes
  to clicks the same way (themes differ only in size, pool and propensity,
  so one shared model is right); at 1 each theme's mapping is its cluster's
  random transform and one shared mapping fits no theme well. Default 0.5.
* **Clicks** come in sessions: a theme by size weight, a user by activity, a
  session length by the theme's propensity, then that many distinct items
  of the pool drawn without replacement with probability proportional to
  ``exp(beta_t * score_t(u, i))`` (Gumbel top-k). Which items a user clicks
  inside a theme thus depends on user x item x theme, which is exactly what
  separates the protocol's positives from its negatives (the theme's clicked
  items the user did not click).
* **Pretrained vectors** are noisy projections of the latent factors into
  ``dim`` (128) dimensions: ``e_u = z_u P_user / sqrt(k) + noise * eps``
  (``P`` a random ``k x dim`` matrix, ``eps ~ N(0, I)``), the same for items
  with their own projection, written with 4 decimals.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

CLICK_LOG = "theme_click_log.csv"
USER_EMBEDDING = "user_embedding.csv"
ITEM_EMBEDDING = "item_embedding.csv"
THEME_ITEM_POOL = "theme_item_pool.csv"
PURCHASE_LOG = "user_item_purchase_log.csv"
RAW_FILES = (CLICK_LOG, USER_EMBEDDING, ITEM_EMBEDDING, THEME_ITEM_POOL, PURCHASE_LOG)
MARKER = "SYNTHETIC.json"  # marks a folder as written by this generator

LATENT_DIM = 16
N_CATEGORIES = 60
SESSION_CHUNK = 100_000  # sessions generated and written per chunk
SCORE_BLOCK = 4_000_000  # (session x pool item) scores held at once
EMBEDDING_CHUNK = 50_000  # vectors formatted and written per chunk


@dataclass
class _World:
    """The latent state every file is drawn from."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    theme_ids: np.ndarray
    z_user: np.ndarray  # [U, k]
    v_item: np.ndarray  # [I, k]
    log_pop: np.ndarray  # [I]
    category: np.ndarray  # [I] leaf category id
    activity_cdf: np.ndarray  # [U]
    theme_cdf: np.ndarray  # [T]
    pools: list[np.ndarray]  # item indices of each theme's pool
    transform: np.ndarray  # [T, k, k] M_t
    item_bias: np.ndarray  # [T, k] w_t
    propensity: np.ndarray  # [T] Poisson mean of extra clicks per session
    beta: np.ndarray  # [T]


def _unique_ids(rng: np.random.Generator, n: int, start: int) -> np.ndarray:
    """``n`` distinct, realistic-looking (large, gappy, shuffled) integer ids."""
    return rng.permutation(start + np.cumsum(rng.integers(1, 40, size=n)))


def _theme_pools(rng, n_themes, n_items, log_pop, v_item, centres) -> list[np.ndarray]:
    """Each theme's pool: items by popularity and closeness to the theme centre (Gumbel top-k)."""
    sizes = np.clip(np.exp(rng.normal(np.log(300), 0.9, size=n_themes)), 30, 2000).astype(int)
    sizes = np.minimum(sizes, n_items)
    pools = []
    for t in range(n_themes):
        logits = 0.5 * log_pop + 1.5 * (v_item @ centres[t]) / np.sqrt(LATENT_DIM)
        keys = logits + rng.gumbel(size=n_items)
        pools.append(np.sort(np.argpartition(-keys, sizes[t] - 1)[: sizes[t]]))
    return pools


def _theme_mappings(rng, n_themes: int, heterogeneity: float) -> tuple[np.ndarray, np.ndarray]:
    """``M_t`` and ``w_t``: alike within a cluster, unlike across clusters, scaled by ``h``."""
    k = LATENT_DIM
    n_clusters = max(2, n_themes // 5)
    cluster = rng.integers(0, n_clusters, size=n_themes)
    r_cluster = rng.normal(0, 1 / np.sqrt(k), size=(n_clusters, k, k))
    r_theme = rng.normal(0, 1 / np.sqrt(k), size=(n_themes, k, k))
    w_cluster = rng.normal(0, 1, size=(n_clusters, k))
    w_theme = rng.normal(0, 1, size=(n_themes, k))
    q = 0.8 * r_cluster[cluster] + 0.6 * r_theme
    transform = (1 - heterogeneity) * np.eye(k) + heterogeneity * q
    item_bias = heterogeneity * (0.8 * w_cluster[cluster] + 0.6 * w_theme) / np.sqrt(k)
    return transform.astype(np.float32), item_bias.astype(np.float32)


def _world(n_themes, n_users, n_items, heterogeneity, rng) -> _World:
    k = LATENT_DIM
    activity = rng.lognormal(0.0, 1.0, size=n_users)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    log_pop = np.log(rng.permutation(popularity) / popularity.max()).astype(np.float32)
    v_item = rng.normal(size=(n_items, k)).astype(np.float32)
    theme_weight = 1.0 / np.arange(1, n_themes + 1)
    centres = rng.normal(size=(n_themes, k))
    transform, item_bias = _theme_mappings(rng, n_themes, heterogeneity)
    return _World(
        user_ids=_unique_ids(rng, n_users, 10_000),
        item_ids=_unique_ids(rng, n_items, 1_000_000),
        theme_ids=_unique_ids(rng, n_themes, 100),
        z_user=rng.normal(size=(n_users, k)).astype(np.float32),
        v_item=v_item,
        log_pop=log_pop,
        category=rng.integers(0, N_CATEGORIES, size=n_items) * 7 + 50_011,
        activity_cdf=np.cumsum(activity) / activity.sum(),
        theme_cdf=np.cumsum(theme_weight) / theme_weight.sum(),
        pools=_theme_pools(rng, n_themes, n_items, log_pop, v_item, centres),
        transform=transform,
        item_bias=item_bias,
        propensity=rng.uniform(0.3, 3.0, size=n_themes),
        beta=rng.uniform(1.5, 3.0, size=n_themes),
    )


def _draw(cdf: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(cdf) - 1)


def _session_items(w: _World, t: int, users: np.ndarray, lengths: np.ndarray, rng) -> np.ndarray:
    """Items of each session of theme ``t`` (flattened, session by session): Gumbel top-k."""
    pool = w.pools[t]
    pool_v = w.v_item[pool]
    item_term = pool_v @ w.item_bias[t] + 0.5 * w.log_pop[pool]
    top = int(lengths.max())
    out = np.empty((len(users), top), dtype=np.int64)
    block = max(1, SCORE_BLOCK // len(pool))
    for s in range(0, len(users), block):
        taste = w.z_user[users[s : s + block]] @ w.transform[t].T
        logits = (taste @ pool_v.T) / np.sqrt(LATENT_DIM) + item_term
        uniform_exp = rng.standard_exponential(logits.shape, dtype=np.float32)
        gumbel = -np.log(np.maximum(uniform_exp, np.finfo(np.float32).tiny))
        keys = w.beta[t] * logits + gumbel
        best = np.argpartition(-keys, top - 1, axis=1)[:, :top]
        order = np.argsort(-np.take_along_axis(keys, best, axis=1), axis=1)
        out[s : s + block] = pool[np.take_along_axis(best, order, axis=1)]
    keep = np.arange(top)[None, :] < lengths[:, None]
    return out[keep]


def _click_chunk(w: _World, n_sessions: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user index, item index, theme index) of ``n_sessions`` sessions, in session order."""
    theme = _draw(w.theme_cdf, n_sessions, rng)
    user = _draw(w.activity_cdf, n_sessions, rng)
    pool_sizes = np.array([len(p) for p in w.pools])
    lengths = np.minimum(1 + rng.poisson(w.propensity[theme]), np.minimum(pool_sizes[theme], 50))
    items = np.empty(int(lengths.sum()), dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    for t in np.unique(theme):
        sessions = np.flatnonzero(theme == t)
        chosen = _session_items(w, int(t), user[sessions], lengths[sessions], rng)
        positions = np.repeat(starts[sessions], lengths[sessions])
        positions += _ranks(lengths[sessions])
        items[positions] = chosen
    return np.repeat(user, lengths), items, np.repeat(theme, lengths)


def _ranks(lengths: np.ndarray) -> np.ndarray:
    """``0..len-1`` for each group of ``lengths``, concatenated."""
    total = int(lengths.sum())
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(total) - starts


def _write_frame(handle: io.TextIOBase, frame: pl.DataFrame, header: bool) -> None:
    handle.write(frame.write_csv(include_header=header))


def _write_clicks(out: Path, w: _World, n_clicks: int, purchase_rate: float, rng) -> None:
    mean_length = 1 + float(np.mean(w.propensity))
    written, header = 0, True
    with open(out / CLICK_LOG, "w") as clicks, open(out / PURCHASE_LOG, "w") as buys:
        while written < n_clicks:
            need = n_clicks - written
            n_sessions = min(SESSION_CHUNK, max(1, int(need / mean_length * 1.05) + 1))
            user, item, theme = _click_chunk(w, n_sessions, rng)
            user, item, theme = user[:need], item[:need], theme[:need]
            frame = pl.DataFrame(
                {
                    "user_id": w.user_ids[user],
                    "item_id": w.item_ids[item],
                    "theme_id": w.theme_ids[theme],
                    "leaf_cate_id": w.category[item],
                }
            )
            _write_frame(clicks, frame, header)
            bought = rng.random(len(user)) < purchase_rate
            stamps = 1_500_000_000 + (written + np.flatnonzero(bought)) * 7
            purchases = frame.filter(pl.Series(bought)).select("user_id", "item_id", "leaf_cate_id")
            _write_frame(buys, purchases.with_columns(time_stamp=pl.Series(stamps)), header)
            written += len(user)
            header = False


def _write_pools(out: Path, w: _World) -> None:
    with open(out / THEME_ITEM_POOL, "w") as handle:
        for t, pool in enumerate(w.pools):
            theme = np.full(len(pool), w.theme_ids[t])
            frame = pl.DataFrame({"theme_id": theme, "item_id": w.item_ids[pool]})
            _write_frame(handle, frame, t == 0)


def _write_embeddings(path: Path, id_name: str, ids, latent, dim, noise, keep, rng) -> None:
    """``id,emb`` rows: noisy projection of ``latent`` into ``dim`` dims, as one string each."""
    projection = rng.normal(size=(latent.shape[1], dim)).astype(np.float32)
    projection /= np.sqrt(latent.shape[1])
    rows = np.flatnonzero(keep)
    with open(path, "w") as handle:
        handle.write(f"{id_name},emb\n")
        for s in range(0, len(rows), EMBEDDING_CHUNK):
            chunk = rows[s : s + EMBEDDING_CHUNK]
            vectors = latent[chunk] @ projection
            vectors += noise * rng.standard_normal(vectors.shape, dtype=np.float32)
            columns = pl.DataFrame(
                vectors.round(4), schema=[f"e{j}" for j in range(dim)], orient="row"
            )
            text = columns.select(pl.concat_str(pl.all().cast(pl.String), separator=" "))
            frame = pl.DataFrame({id_name: ids[chunk], "emb": text.to_series()})
            _write_frame(handle, frame, header=False)


def _check_args(n_themes, n_users, n_items, n_clicks, dim, heterogeneity, missing) -> None:
    for name, value, low in (
        ("themes", n_themes, 1),
        ("users", n_users, 1),
        ("items", n_items, 2),
        ("clicks", n_clicks, 1),
        ("dim", dim, 1),
    ):
        if value < low:
            raise ValueError(f"--{name} must be >= {low}, got {value}")
    if not 0 <= heterogeneity <= 1:
        raise ValueError(f"--heterogeneity must be in [0, 1], got {heterogeneity}")
    if not 0 <= missing < 1:
        raise ValueError(f"--missing-vectors must be in [0, 1), got {missing}")


def _check_out(out: Path) -> None:
    """Refuse to write over a folder that holds anything but this generator's own output."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise FileExistsError(
            f"{out} is not empty and was not written by this generator; choose an empty "
            f"or new folder (real Taobao files are never overwritten)"
        )


def generate_taobao(
    out: str | Path,
    n_themes: int = 30,
    n_users: int = 20_000,
    n_items: int = 8_000,
    n_clicks: int = 1_000_000,
    seed: int = 0,
    dim: int = 128,
    heterogeneity: float = 0.5,
    noise: float = 0.5,
    missing_vectors: float = 0.02,
    purchase_rate: float = 0.03,
) -> Path:
    """Write the five CloudTheme files to ``out`` (see the module docstring); return ``out``.

    Deterministic given all arguments. ``heterogeneity`` (0..1) sets how much
    the themes' taste-to-click mappings differ; ``noise`` the std of the noise
    added to the pretrained vectors; ``missing_vectors`` the share of users and
    items written without a vector.
    """
    _check_args(n_themes, n_users, n_items, n_clicks, dim, heterogeneity, missing_vectors)
    out = Path(out)
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    world = _world(n_themes, n_users, n_items, heterogeneity, rng)
    _write_clicks(out, world, n_clicks, purchase_rate, rng)
    _write_pools(out, world)
    for path, id_name, ids, latent in (
        (out / USER_EMBEDDING, "user_id", world.user_ids, world.z_user),
        (out / ITEM_EMBEDDING, "item_id", world.item_ids, world.v_item),
    ):
        keep = rng.random(len(ids)) >= missing_vectors
        _write_embeddings(path, id_name, ids, latent, dim, noise, keep, rng)
    params = {
        "themes": n_themes,
        "users": n_users,
        "items": n_items,
        "clicks": n_clicks,
        "seed": seed,
        "dim": dim,
        "heterogeneity": heterogeneity,
        "noise": noise,
        "missing_vectors": missing_vectors,
    }
    note = "Synthetic Taobao CloudTheme-format data (moe_mlora.data.synthetic_taobao), not real."
    (out / MARKER).write_text(json.dumps({"note": note, **params}, indent=2))
    return out
