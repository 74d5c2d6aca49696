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

Reading and checking the files is in :mod:`.taobao_files`; negative sampling in
:mod:`.taobao_negatives`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from moe_mlora.data.cache import (
    load_or_build,
)
from moe_mlora.data.processed import DataError, FieldSpec, ProcessedData
from moe_mlora.data.splits import check_fractions, split_tensors, stratified_domain_split
from moe_mlora.data.synthetic_taobao import RAW_FILES
from moe_mlora.data.taobao_files import (
    DATASET_URL,
    GENERATE_HINT,
    Vectors,
    check_root,
    read_clicks,
    read_vectors,
)
from moe_mlora.data.taobao_negatives import (  # noqa: F401  (theme_negatives: re-exported)
    CTR_RATIO_RANGE,
    sample_negatives,
    theme_negatives,
)

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1  # bump when build_taobao's output changes, to invalidate caches
FIELDS = ("user", "item", "domain")
OOV_TOKEN = "<oov>"
MIN_CLICKS = 5  # a theme with fewer positives is left out (warned)


def missing_root_message() -> str:
    """What a user without data.root must be told: the files, their source, the stand-in."""
    return (
        "data.root is not set: give the folder of the Taobao CloudTheme files "
        f"({', '.join(RAW_FILES)}; the protocol reads the first three). The real data is "
        f"Tianchi dataset 9716 ({DATASET_URL}). To make stand-ins in the real format: "
        f"{GENERATE_HINT}, then data.root=DIR; or let the run make them itself with "
        "data.generate_if_missing=true"
    )


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
