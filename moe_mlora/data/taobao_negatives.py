"""Step 3 of the Taobao protocol: each theme's negatives, drawn per user without replacement.

**Negative sampling** is vectorised per theme (a Python loop over themes and
rounds, never over users), and never materialises the users x items cross
product of a theme: a user who needs (almost) all of the theme's items
(``3 (n_u + k_u) >= |items|``) gets random keys over the theme's items,
their clicked items removed and the ``k_u`` smallest kept, in chunks of at
most :data:`DENSE_PAIRS` pairs; at most ``3 (n_u + k_u) <= 18 n_u`` pairs per
such user. Every other user draws ``1.5 k_u + 8`` items with replacement
per round, clicked and repeated items are rejected, and the first ``k_u``
distinct ones are kept (the first k distinct values of an i.i.d. uniform
sequence over the allowed items are a uniform k-subset); at least 2/3 of the
draws are accepted, so rounds are few and memory stays O(clicks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from moe_mlora.data.taobao import Clicks

CTR_RATIO_RANGE = (0.2, 0.5)
DENSE_PAIRS = 8_000_000  # (user, item) pairs scored at once by the dense sampler


def _group_ranks(groups: np.ndarray) -> np.ndarray:
    """Position of each element inside its run of equal, contiguous ``groups`` values."""
    if groups.size == 0:
        return groups
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    lengths = np.diff(np.r_[starts, groups.size])
    return np.arange(groups.size) - np.repeat(starts, lengths)


def _dense_negatives(users, need, n_items, clicked, rng) -> tuple[np.ndarray, np.ndarray]:
    """Uniform ``need[j]``-subsets of the non-clicked items, via random keys over all items."""
    quota = np.zeros(int(users.max(initial=0)) + 1, dtype=np.int64)
    quota[users] = need
    out_u, out_i = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    per_chunk = max(1, DENSE_PAIRS // n_items)
    for s in range(0, len(users), per_chunk):
        chunk = users[s : s + per_chunk]
        u = np.repeat(chunk, n_items)
        i = np.tile(np.arange(n_items, dtype=np.int64), chunk.size)
        allowed = ~_member(u * n_items + i, clicked)
        u, i = u[allowed], i[allowed]
        order = np.lexsort((rng.random(u.size), u))  # a random order inside each user
        u, i = u[order], i[order]
        take = _group_ranks(u) < quota[u]
        out_u.append(u[take])
        out_i.append(i[take])
    return np.concatenate(out_u), np.concatenate(out_i)


def _member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(sorted_keys, keys).clip(max=max(sorted_keys.size - 1, 0))
    return sorted_keys[pos] == keys if sorted_keys.size else np.zeros(keys.size, bool)


def _rejection_negatives(users, need, n_items, clicked, rng) -> tuple[np.ndarray, np.ndarray]:
    """Draw with replacement, reject clicked and repeated items, keep the first ``need``."""
    taken = np.zeros(0, dtype=np.int64)
    if users.size == 0:
        return taken, taken
    pending, remaining = users, need.copy()
    while pending.size:
        draws = np.ceil(1.5 * remaining).astype(np.int64) + 8
        u = np.repeat(pending, draws)
        keys = u * n_items + rng.integers(0, n_items, size=u.size)
        fresh = ~_member(keys, clicked) & ~_member(keys, taken)
        keys, u = keys[fresh], u[fresh]
        _, first = np.unique(keys, return_index=True)
        first.sort()  # first occurrence of each pair, in draw order (grouped by user)
        keys, u = keys[first], u[first]
        rank = _group_ranks(u)
        quota = np.zeros(int(users.max()) + 1, dtype=np.int64)
        quota[pending] = remaining
        keep = rank < quota[u]
        taken = np.sort(np.concatenate([taken, keys[keep]]))
        got = np.bincount(u[keep], minlength=quota.size)[pending]
        remaining = remaining - got
        pending, remaining = pending[remaining > 0], remaining[remaining > 0]
    return taken // n_items, taken % n_items


def theme_negatives(
    user: np.ndarray, item: np.ndarray, ratio: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One theme's negatives: ``min(int(n_u / ratio), available)`` per user, as (user, item)
    sorted by user then item."""
    users, u_loc, n_clicks = np.unique(user, return_inverse=True, return_counts=True)
    items, i_loc = np.unique(item, return_inverse=True)
    n_items = items.size
    clicked = np.sort(u_loc.reshape(-1) * n_items + i_loc.reshape(-1))
    need = np.minimum(np.floor(n_clicks / ratio).astype(np.int64), n_items - n_clicks)
    local = np.arange(users.size, dtype=np.int64)
    dense = 3 * (n_clicks + need) >= n_items
    some = need > 0
    dense_u, dense_i = _dense_negatives(
        local[dense & some], need[dense & some], n_items, clicked, rng
    )
    sparse_u, sparse_i = _rejection_negatives(
        local[~dense & some], need[~dense & some], n_items, clicked, rng
    )
    neg_u, neg_i = np.r_[dense_u, sparse_u], np.r_[dense_i, sparse_i]
    order = np.lexsort((neg_i, neg_u))
    return users[neg_u[order]], items[neg_i[order]]


def sample_negatives(
    clicks: Clicks,
    seed: int,
    ratio_range: Sequence[float] = CTR_RATIO_RANGE,
    disable: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Step 3: every theme's positives and negatives as (theme, user, item, label), theme by
    theme (positives in log order, then negatives by user and item), and each theme's
    ``ctr_ratio``. ``disable`` is tqdm's (None: bar only on a terminal)."""
    n_themes = len(clicks.theme_names)
    ratios = np.random.default_rng(seed).uniform(*ratio_range, size=n_themes)
    order = np.argsort(clicks.theme, kind="stable")
    bounds = np.searchsorted(clicks.theme[order], np.arange(n_themes + 1))
    parts = []
    for t in tqdm(range(n_themes), desc="negatives", unit="theme", disable=disable, leave=False):
        rows = order[bounds[t] : bounds[t + 1]]
        u, i = clicks.user[rows], clicks.item[rows]
        neg_u, neg_i = theme_negatives(u, i, float(ratios[t]), np.random.default_rng([seed, t]))
        label = np.r_[np.ones(u.size, np.float32), np.zeros(neg_u.size, np.float32)]
        parts.append((np.full(label.size, t), np.r_[u, neg_u], np.r_[i, neg_i], label))
    theme, user, item, label = (np.concatenate([p[k] for p in parts]) for k in range(4))
    return theme.astype(np.int64), user, item, label, ratios
