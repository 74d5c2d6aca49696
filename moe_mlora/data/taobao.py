"""Taobao CloudTheme clicks (Tianchi dataset 9716) as a multi-domain CTR dataset.

Protocol (docs/method.md, "Taobao CloudTheme"), applied exactly:

1. read ``theme_click_log.csv`` (columns ``user_id``, ``item_id``, ``theme_id``;
   others ignored) and keep the clicks whose user and item both have a vector
   in ``user_embedding.csv`` / ``item_embedding.csv`` (the others are counted
   and logged, not an error); drop duplicate clicks (same user, item, theme);
2. themes are the domains, ordered by first appearance in that log;
   Taobao-N keeps the first N; domain names are the theme ids as strings;
3. every click is a positive; per theme and user, ``int(n_clicks / ctr_ratio)``
   negatives are drawn uniformly without replacement from the theme's clicked
   items the user did not click (all of them if fewer exist), with
   ``ctr_ratio ~ U[0.2, 0.5]`` drawn per theme;
4. each theme is split 60 / 20 / 20, stratified by label, seed 123
   (:func:`~moe_mlora.data.splits.stratified_domain_split`).

Fields: ``user`` and ``item`` carry the pretrained vectors as tables
(``FieldSpec.pretrained``, row 0 zeros for unseen ids), ``domain`` is learned.
The backbone looks each vector up in its frozen table and projects it with a
learned bias-free Linear to ``model.embedding_dim`` (see
:mod:`moe_mlora.models.features`): FM-style interactions need one width for
all fields, and the tower input stays ``3 * embedding_dim`` wide. Set
``model.embedding_dim=128`` to keep the full width; ``freeze_pretrained=False``
makes the tables trainable (initialised from the vectors).

Randomness: ``ctr_ratio`` comes from ``default_rng(seed)`` (theme t gets the
t-th draw) and theme t's negatives from ``default_rng([seed, t])``, so a theme's
samples are the same in Taobao-10, -20 and -30; the split uses ``seed`` too.

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

import logging
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from moe_mlora.data.cache import (
    default_cache_dir,
    generated_dir,
    load_or_build,
    write_atomically,
)
from moe_mlora.data.processed import DataError, FieldSpec, ProcessedData
from moe_mlora.data.splits import check_fractions, split_tensors, stratified_domain_split
from moe_mlora.data.synthetic_taobao import (
    CLICK_LOG,
    ITEM_EMBEDDING,
    RAW_FILES,
    USER_EMBEDDING,
)

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1  # bump when build_taobao's output changes, to invalidate caches
NEEDED_FILES = (CLICK_LOG, USER_EMBEDDING, ITEM_EMBEDDING)
CLICK_COLUMNS = ("user_id", "item_id", "theme_id")
FIELDS = ("user", "item", "domain")
OOV_TOKEN = "<oov>"
CTR_RATIO_RANGE = (0.2, 0.5)
MIN_CLICKS = 5  # a theme with fewer positives is left out (warned)
DENSE_PAIRS = 8_000_000  # (user, item) pairs scored at once by the dense sampler
PARSE_CHUNK = 100_000  # embedding rows parsed at once
DATASET_URL = "https://tianchi.aliyun.com/dataset/9716"
GENERATE_HINT = (
    "python -m moe_mlora.data.generate taobao --out DIR --themes 30 --users 20000 "
    "--items 8000 --clicks 1000000"
)


def missing_root_message() -> str:
    """What a user without data.root must be told: the files, their source, the stand-in."""
    return (
        "data.root is not set: give the folder of the Taobao CloudTheme files "
        f"({', '.join(RAW_FILES)}; the protocol reads the first three). The real data is "
        f"Tianchi dataset 9716 ({DATASET_URL}). To make stand-ins in the real format: "
        f"{GENERATE_HINT}, then data.root=DIR; or let the run make them itself with "
        "data.generate_if_missing=true"
    )


# ----------------------------------------------------------------------------- reading


def check_root(root: Path) -> list[Path]:
    """The three needed files under ``root``; a :class:`DataError` names what is missing."""
    if root.exists() and not root.is_dir():
        raise DataError(
            f"data.root={root} is a file; give the folder that holds {', '.join(NEEDED_FILES)}"
        )
    if not root.is_dir():
        raise DataError(
            f"data.root={root}: no such folder; give the folder that holds "
            f"{', '.join(NEEDED_FILES)}. Real data: Tianchi dataset 9716 ({DATASET_URL}); "
            f"stand-ins: {GENERATE_HINT}"
        )
    missing = [name for name in NEEDED_FILES if not (root / name).is_file()]
    if missing:
        raise DataError(
            f"Taobao root {root} is missing {', '.join(missing)} (the protocol needs "
            f"{', '.join(NEEDED_FILES)}). Real data: Tianchi dataset 9716 ({DATASET_URL}); "
            f"stand-ins: {GENERATE_HINT}"
        )
    return [root / name for name in NEEDED_FILES]


def _header(path: Path) -> list[str]:
    with open(path, encoding="utf-8-sig", errors="replace") as handle:  # -sig: drop a BOM
        first = handle.readline().strip()
    if not first:
        raise DataError(f"{path}: empty file; expected a header line")
    return [name.strip().strip('"') for name in first.split(",")]


def _as_ids(values: pl.Series) -> pl.Series:
    """Integer ids when every value is one (cheaper joins), else the strings."""
    ints = values.cast(pl.Int64, strict=False)
    return ints if ints.null_count() == values.null_count() else values


def _bad_row(path: Path, row: int, expected: str, got: str) -> DataError:
    """A header line, then one row per line: data row ``row`` (0-based) is line ``row + 2``."""
    return DataError(f"{path}, line {row + 2}: expected {expected}; got {got!r}")


def read_clicks(path: Path) -> pl.DataFrame:
    """``user_id``, ``item_id``, ``theme_id`` of every click, in file order."""
    header = _header(path)
    missing = [c for c in CLICK_COLUMNS if c not in header]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; the header has {header}, the "
            f"protocol needs {', '.join(CLICK_COLUMNS)}"
        )
    frame = pl.read_csv(
        path, columns=list(CLICK_COLUMNS), schema_overrides=dict.fromkeys(CLICK_COLUMNS, pl.String)
    )
    for name in CLICK_COLUMNS:
        empty = frame[name].is_null() | (frame[name].str.strip_chars() == "")
        if empty.any():
            raise _bad_row(path, int(empty.arg_true()[0]), f"a {name}", "")
    return frame.with_columns(_as_ids(frame[name]) for name in CLICK_COLUMNS)


def _parse_vectors(path: Path, text: pl.Series, offset: int, dim: int | None) -> np.ndarray:
    """Rows of space-separated floats -> ``[n, dim]`` float32; a bad row raises with its line."""
    tokens = (
        text.fill_null("")
        .str.strip_chars()
        .str.split(" ")
        .list.eval(pl.element().filter(pl.element() != ""))
    )
    lengths = tokens.list.len().to_numpy()
    dim = int(lengths[0]) if dim is None else dim
    bad = np.flatnonzero(lengths != dim)
    if bad.size or dim == 0:
        row = int(bad[0]) if bad.size else 0
        raise _bad_row(path, offset + row, f"{dim} space-separated floats", text[row])
    values = tokens.list.eval(pl.element().cast(pl.Float32, strict=False))
    bad_value = values.list.eval(pl.element().is_null()).list.any()
    if bad_value.any():
        row = int(bad_value.arg_true()[0])
        raise _bad_row(path, offset + row, f"{dim} numbers", text[row])
    vectors = values.explode().to_numpy().astype(np.float32).reshape(-1, dim)
    _check_finite(path, vectors, offset, lambda row: text[row])
    return vectors


def _check_finite(path: Path, vectors: np.ndarray, offset: int, line_of) -> None:
    """NaN or inf (or a value beyond float32) in a pretrained vector: refuse at load, naming
    the line, rather than let it surface as a NaN loss epochs later."""
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise _bad_row(path, offset + row, "finite numbers (no nan or inf)", line_of(row))


def _wide_vectors(path: Path, frame: pl.DataFrame) -> np.ndarray:
    """The wide form (one column per dimension) -> ``[n, dim]`` float32."""
    columns = frame.columns[1:]
    values = frame.select(
        pl.col(c).str.strip_chars().cast(pl.Float32, strict=False) for c in columns
    )
    bad = values.select(pl.any_horizontal(pl.all().is_null())).to_series()
    if bad.any():
        row = int(bad.arg_true()[0])
        return_row = ",".join("" if v is None else str(v) for v in frame.row(row))
        raise _bad_row(path, row, f"{len(columns)} numbers after the id", return_row)
    vectors = values.to_numpy().astype(np.float32)
    _check_finite(path, vectors, 0, lambda row: ",".join(str(v) for v in frame.row(row)))
    return vectors


@dataclass
class Vectors:
    """Pretrained vectors of one file: ids (unique) and their rows."""

    ids: pl.Series
    vectors: np.ndarray  # float32 [n, dim]

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def read_vectors(path: Path) -> Vectors:
    """``id,emb`` (one string of space-separated floats) or the wide ``id,v1,...,vD`` form."""
    header = _header(path)
    if len(header) < 2:
        raise DataError(
            f"{path}: expected a header 'id,emb' (vector as space-separated floats) or "
            f"'id,v1,...,vD'; got {header}"
        )
    frame = pl.read_csv(path, infer_schema=False, truncate_ragged_lines=False)
    id_col = frame.columns[0]
    if frame.height == 0:
        raise DataError(f"{path}: no vectors after the header")
    empty = frame[id_col].is_null()
    if empty.any():
        raise _bad_row(path, int(empty.arg_true()[0]), "an id in the first column", "")
    if frame.width == 2:
        text = frame[frame.columns[1]]
        parts, dim = [], None
        for start in range(0, frame.height, PARSE_CHUNK):
            part = _parse_vectors(path, text.slice(start, PARSE_CHUNK), start, dim)
            dim = part.shape[1]
            parts.append(part)
        vectors = np.concatenate(parts)
    else:
        vectors = _wide_vectors(path, frame)
    ids = _as_ids(frame[id_col].str.strip_chars())
    duplicated = ids.is_duplicated()
    if duplicated.any():
        row = int(duplicated.arg_true()[1] if duplicated.sum() > 1 else duplicated.arg_true()[0])
        raise _bad_row(path, row, "each id once (it appeared before)", str(ids[row]))
    return Vectors(ids, vectors)


# ----------------------------------------------------------------------------- protocol


def _align(left: pl.Series, right: pl.Series) -> tuple[pl.Series, pl.Series]:
    """Same dtype on both sides of a join (strings when either side is not all integers)."""
    if left.dtype == right.dtype:
        return left, right
    return left.cast(pl.String), right.cast(pl.String)


def _encode(ids: pl.Series, vectors: Vectors) -> tuple[np.ndarray, np.ndarray, pl.Series]:
    """Index (1-based, 0 = no vector) of each id in the sorted distinct ids that have a vector,
    the table ``[1 + n, dim]`` (row 0 zeros) of those vectors, and those ids."""
    ids, vec_ids = _align(ids, vectors.ids)
    known = vec_ids.to_frame("id").with_row_index("row")
    used = ids.unique().sort().to_frame("id").join(known, on="id", how="inner").sort("id")
    index = ids.to_frame("id").join(
        used.with_row_index("code", offset=1).select("id", "code"), on="id", how="left"
    )["code"]
    table = np.zeros((used.height + 1, vectors.dim), dtype=np.float32)
    table[1:] = vectors.vectors[used["row"].to_numpy()]
    return index.fill_null(0).to_numpy().astype(np.int64), table, used["id"]


@dataclass
class Clicks:
    """Clicks kept by the protocol, encoded: theme index in first-appearance order, user and
    item indices into their vector tables."""

    theme: np.ndarray  # int64, 0 .. N-1
    user: np.ndarray  # int64, 1 .. n_users
    item: np.ndarray  # int64, 1 .. n_items
    theme_names: list[str]
    user_table: np.ndarray
    item_table: np.ndarray
    user_vocab: list[str]
    item_vocab: list[str]
    report: dict


def select_clicks(frame: pl.DataFrame, users: Vectors, items: Vectors, themes: int) -> Clicks:
    """Steps 1-2 of the protocol: the vector filter, duplicates, first-N themes, encoding."""
    user_idx, user_table, user_ids = _encode(frame["user_id"], users)
    item_idx, item_table, item_ids = _encode(frame["item_id"], items)
    report = {
        "clicks_read": frame.height,
        "clicks_without_user_vector": int((user_idx == 0).sum()),
        "clicks_without_item_vector": int((item_idx == 0).sum()),
    }
    keep = (user_idx > 0) & (item_idx > 0)
    kept = pl.DataFrame(
        {"theme_id": frame["theme_id"].filter(pl.Series(keep)), "u": user_idx[keep]}
    ).with_columns(i=pl.Series(item_idx[keep]))
    kept = kept.unique(subset=["theme_id", "u", "i"], keep="first", maintain_order=True)
    report["clicks_without_vectors"] = int((~keep).sum())
    report["duplicate_clicks"] = int(keep.sum()) - kept.height
    order = kept["theme_id"].unique(maintain_order=True)
    if len(order) == 0:
        reason = (
            "it has no clicks"
            if frame.height == 0
            else f"none of its {frame.height:,} clicks has both a user and an item vector "
            "(the ids of the click log and of the two vector files do not match)"
        )
        raise DataError(f"the click log gives no usable clicks: {reason}")
    if themes > len(order):
        raise DataError(
            f"data.themes={themes} but the click log has only {len(order)} themes with "
            f"vectors for their users and items; choose data.themes <= {len(order)}"
        )
    chosen = order.head(themes)
    codes = chosen.to_frame("theme_id").with_row_index("t")
    kept = kept.join(codes, on="theme_id", how="inner", maintain_order="left")
    report["clicks_kept"] = kept.height
    return _compact_vocab(kept, chosen, user_table, item_table, user_ids, item_ids, report)


def _compact_vocab(kept, chosen, user_table, item_table, user_ids, item_ids, report) -> Clicks:
    """Re-index users and items over the kept clicks only, so the tables hold nothing unused."""
    u_used, u_new = np.unique(kept["u"].to_numpy(), return_inverse=True)
    i_used, i_new = np.unique(kept["i"].to_numpy(), return_inverse=True)
    return Clicks(
        theme=kept["t"].to_numpy().astype(np.int64),
        user=u_new.reshape(-1).astype(np.int64) + 1,
        item=i_new.reshape(-1).astype(np.int64) + 1,
        theme_names=[str(t) for t in chosen.to_list()],
        user_table=np.concatenate([user_table[:1], user_table[u_used]]),
        item_table=np.concatenate([item_table[:1], item_table[i_used]]),
        user_vocab=[OOV_TOKEN, *(str(v) for v in user_ids.gather(u_used - 1).to_list())],
        item_vocab=[OOV_TOKEN, *(str(v) for v in item_ids.gather(i_used - 1).to_list())],
        report=report,
    )


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


def _unusable_themes(theme, label, n_themes) -> dict[int, str]:
    positives = np.bincount(theme, weights=label, minlength=n_themes)
    totals = np.bincount(theme, minlength=n_themes)
    out = {}
    for t in range(n_themes):
        if positives[t] < MIN_CLICKS:
            out[t] = f"{int(positives[t])} clicks (< {MIN_CLICKS})"
        elif positives[t] == totals[t]:
            out[t] = "no negatives (every user clicked every item of the theme)"
    return out


def _check_options(themes: int, fractions: Sequence[float], ratio_range: Sequence[float]) -> None:
    if int(themes) < 1:
        raise DataError(f"data.themes must be >= 1, got {themes}")
    check_fractions(fractions)
    low, high = ratio_range
    if not 0 < low <= high <= 1:
        raise DataError(f"ctr_ratio range must satisfy 0 < low <= high <= 1, got {ratio_range}")


def build_taobao(
    root: str | Path,
    themes: int,
    seed: int = 123,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    ctr_ratio: Sequence[float] = CTR_RATIO_RANGE,
    progress: bool | None = None,
) -> ProcessedData:
    """Read the CloudTheme files under ``root`` and apply the Taobao-``themes`` protocol."""
    _check_options(themes, fractions, ctr_ratio)
    root = Path(root).expanduser().resolve()
    clicks_file, users_file, items_file = check_root(root)
    disable = None if progress is None else not progress
    bar = tqdm(total=5, desc=f"Taobao-{themes}", unit="stage", disable=disable)

    stages = ["clicks", "vectors", "filter", "negatives", "split"]

    def stage(name: str) -> None:
        """The bar's stage; without a bar (a pipe, a job log) a log line instead."""
        bar.set_postfix_str(name)
        if bar.disable:
            number = stages.index(name) + 1
            log.info("Taobao-%d preprocessing: %s (stage %d of 5)", themes, name, number)

    try:
        stage("clicks")
        frame = read_clicks(clicks_file)
        bar.update()
        stage("vectors")
        users, items = read_vectors(users_file), read_vectors(items_file)
        bar.update()
        stage("filter")
        clicks = select_clicks(frame, users, items, int(themes))
        del frame
        _log_report(root, clicks.report)
        bar.update()
        stage("negatives")
        samples = list(sample_negatives(clicks, seed, ctr_ratio, disable))
        bar.update()
        stage("split")
        data = _assemble(clicks, samples, seed, fractions)
        bar.update()
    finally:
        bar.close()
    data.meta.update(root=str(root), themes=int(themes), ctr_ratio_range=list(ctr_ratio))
    return data


def _log_report(root: Path, report: dict) -> None:
    if report["clicks_without_vectors"]:
        log.warning(
            "Taobao at %s: %d of %d clicks dropped because their user (%d) or item (%d) has "
            "no vector",
            root,
            report["clicks_without_vectors"],
            report["clicks_read"],
            report["clicks_without_user_vector"],
            report["clicks_without_item_vector"],
        )
    log.info("Taobao at %s: %s", root, report)


def _assemble(clicks: Clicks, samples: list, seed: int, fractions) -> ProcessedData:
    """Drop unusable themes (warned), re-index domains, split, and package the tensors.

    ``samples``: :func:`sample_negatives`'s arrays, emptied here so that each 30M-row
    column is freed as soon as it is used (peak memory of a 10M-click build).
    """
    theme, user, item, label, ratios = samples
    samples.clear()
    names = clicks.theme_names
    bad = _unusable_themes(theme, label, len(names))
    if bad:
        listing = "; ".join(f"theme {names[t]}: {why}" for t, why in bad.items())
        warnings.warn(
            f"Taobao: {len(bad)} theme(s) left out of training and evaluation: {listing}",
            stacklevel=3,
        )
    keep_theme = np.array([t not in bad for t in range(len(names))])
    if keep_theme.all():  # the usual case: no copy of the 30M-row columns
        domain = theme
    else:
        new_id = np.cumsum(keep_theme) - 1
        rows = keep_theme[theme]
        domain = new_id[theme[rows]].astype(np.int64)
        user, item, label = user[rows], item[rows], label[rows]
    domain_names = [n for n, k in zip(names, keep_theme, strict=True) if k]
    sparse = np.empty((domain.size, 3), dtype=np.int64)
    sparse[:, 0], sparse[:, 1], sparse[:, 2] = user, item, domain + 1
    del user, item
    codes = stratified_domain_split(domain, label, fractions, seed)
    fields = [
        FieldSpec("user", len(clicks.user_vocab), torch.from_numpy(clicks.user_table)),
        FieldSpec("item", len(clicks.item_vocab), torch.from_numpy(clicks.item_table)),
        FieldSpec("domain", len(domain_names) + 1),
    ]
    return ProcessedData(
        fields=fields,
        domain_names=domain_names,
        splits=split_tensors(sparse, domain, label, codes),
        vocabularies={
            "user": clicks.user_vocab,
            "item": clicks.item_vocab,
            "domain": [OOV_TOKEN, *domain_names],
        },
        meta={
            "source": "taobao",
            "seed": int(seed),
            "fractions": [float(f) for f in fractions],
            "ctr_ratio": {names[t]: float(r) for t, r in enumerate(ratios)},
            "dropped_themes": {names[t]: why for t, why in bad.items()},
            "report": clicks.report,
            "pretrained_dim": int(clicks.user_table.shape[1]),
        },
    )


def prepare_taobao(
    root: str | Path,
    themes: int,
    seed: int = 123,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    ctr_ratio: Sequence[float] = CTR_RATIO_RANGE,
    cache_dir: Path | None = None,
    progress: bool | None = None,
) -> ProcessedData:
    """:func:`build_taobao` through the cache (``cache_dir=None``: no cache).

    The key holds every protocol option and :data:`PROTOCOL_VERSION`; the three
    files read are fingerprinted (name, size, mtime), so a changed file is
    re-processed.
    """
    _check_options(themes, fractions, ctr_ratio)
    root = Path(root).expanduser().resolve()
    files = check_root(root)
    key = {
        "source": "taobao",
        "version": PROTOCOL_VERSION,
        "root": str(root),
        "themes": int(themes),
        "seed": int(seed),
        "fractions": [float(f) for f in fractions],
        "ctr_ratio": [float(r) for r in ctr_ratio],
    }
    return load_or_build(
        cache_dir,
        key,
        files,
        lambda: build_taobao(root, themes, seed, fractions, ctr_ratio, progress),
        label=f"taobao-{themes}",
    )


# ----------------------------------------------------------------------------- source

GENERATOR_DEFAULTS = {
    "themes": 30,
    "users": 20_000,
    "items": 8_000,
    "clicks": 1_000_000,
    "seed": 0,
    "dim": 128,
    "heterogeneity": 0.5,
}


def _generator_kwargs(options: Mapping | None) -> dict:
    params = {**GENERATOR_DEFAULTS, **dict(options or {})}
    unknown = sorted(set(params) - set(GENERATOR_DEFAULTS))
    if unknown:
        raise DataError(
            f"unknown data.generator option(s) {unknown}; valid: {sorted(GENERATOR_DEFAULTS)}"
        )
    return params


def _generate_into(root: Path, params: dict) -> Path:
    """Generate the files into ``root`` atomically, so concurrent runs (a sweep) and crashes
    never leave a half-written folder (see :func:`write_atomically`)."""
    from moe_mlora.data.synthetic_taobao import generate_taobao

    def write(folder: Path) -> None:
        try:
            generate_taobao(
                folder,
                n_themes=int(params["themes"]),
                n_users=int(params["users"]),
                n_items=int(params["items"]),
                n_clicks=int(params["clicks"]),
                seed=int(params["seed"]),
                dim=int(params["dim"]),
                heterogeneity=float(params["heterogeneity"]),
            )
        except ValueError as error:  # the generator's sizes are config values: name them
            raise DataError(f"data.generator ({params}): {error}") from None

    write_atomically(root, write)
    log.info("generated Taobao CloudTheme-format files (%s) in %s", params, root)
    return root


def resolve_root(
    root: str | Path | None, generate_if_missing: bool, generator: Mapping | None, cache_dir
) -> Path:
    """The folder to read: ``root`` as given, or generated stand-ins when allowed.

    With ``generate_if_missing``: no ``root`` -> files generated once under
    ``<cache_dir>/generated/taobao-<hash of the generator options>``; a ``root``
    that does not exist or is an empty folder -> files generated there. A
    ``root`` holding anything else is never written to.
    """
    if root:
        path = Path(root).expanduser().resolve()
        empty = not path.exists() or (path.is_dir() and not any(path.iterdir()))
        if generate_if_missing and empty:
            return _generate_into(path, _generator_kwargs(generator))
        return path
    if not generate_if_missing:
        raise DataError(missing_root_message())
    params = _generator_kwargs(generator)
    path = generated_dir(Path(cache_dir or default_cache_dir()), "taobao", params)
    if all((path / n).is_file() for n in NEEDED_FILES):
        return path
    if path.exists():  # an earlier attempt died half-way
        shutil.rmtree(path)
    return _generate_into(path, params)


def taobao_source(
    root: str | None,
    themes: int,
    generate_if_missing: bool = False,
    generator: Mapping | None = None,
    freeze_pretrained: bool = True,
    seed: int = 123,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    ctr_ratio: Sequence[float] = CTR_RATIO_RANGE,
    cache_dir: Path | None = None,
    progress: bool | None = None,
) -> ProcessedData:
    """Taobao-``themes`` for the datamodule (``source: taobao`` in conf/data/taobao*.yaml).

    ``freeze_pretrained`` is a model-side choice, so it is not part of the cache
    key: it is set on the user and item :class:`FieldSpec` after loading, and
    :mod:`moe_mlora.models.features` reads it.
    """
    path = resolve_root(root, generate_if_missing, generator, cache_dir)
    data = prepare_taobao(path, int(themes), seed, fractions, ctr_ratio, cache_dir, progress)
    for spec in data.fields:
        if spec.pretrained is not None:
            spec.freeze_pretrained = bool(freeze_pretrained)
    data.meta["freeze_pretrained"] = bool(freeze_pretrained)
    return data
