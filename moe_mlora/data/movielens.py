"""MovieLens (ML-1M and ML-100K) as a multi-domain CTR dataset, following docs/method.md.

Protocol: label = 1 iff rating == 5; users are split into domains by gender
(2), age group (7) or occupation (21); fields are user id, item id and domain
id (user attributes only when asked for); each domain is split 60 / 20 / 20,
stratified by label, seed 123, over the ratings in file order.

The files are read, and every malformed line reported, in
:mod:`moe_mlora.data.movielens_files`; this module turns what is read into fields,
domains and splits.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from moe_mlora.data.cache import load_or_build
from moe_mlora.data.movielens_files import (
    AGE_GROUPS,
    ENCODING,
    FORMAT_FILES,
    GENDERS,
    ML1M_AGE_CODES,
    ML1M_OCCUPATIONS,
    ML100K_OCCUPATIONS,
    detect_format,
    format_files,
    lookup,
    read_item_ids,
    read_ratings,
    read_users,
)
from moe_mlora.data.processed import DataError, FieldSpec, ProcessedData
from moe_mlora.data.splits import check_fractions, split_tensors, stratified_domain_split

__all__ = [  # the file-level names stay importable from here, where they always were
    "AGE_GROUPS",
    "ENCODING",
    "FORMAT_FILES",
    "ML1M_AGE_CODES",
    "ML1M_OCCUPATIONS",
    "ML100K_OCCUPATIONS",
    "build_movielens",
    "detect_format",
    "prepare_movielens",
]

SPLIT_BY = ("gender", "age", "occupation")
BASE_FEATURES = ("user", "item", "domain")
EXTRA_FEATURES = ("gender", "age", "occupation")
FEATURES = BASE_FEATURES + EXTRA_FEATURES
OOV_TOKEN = "<oov>"
PROTOCOL_VERSION = 1  # bump when the output of build_movielens changes, to invalidate caches

# ----------------------------------------------------------------------------- encoding


def _domain_names(fmt: str, split_by: str) -> tuple[str, ...]:
    if split_by == "gender":
        return GENDERS
    if split_by == "age":
        return AGE_GROUPS
    return ML1M_OCCUPATIONS if fmt == "ml-1m" else ML100K_OCCUPATIONS


def _compact_domains(
    canonical: np.ndarray, names: Sequence[str], split_by: str, root: Path
) -> tuple[np.ndarray, list[str]]:
    """Drop canonical domains without ratings and re-index the rest 0..D-1 (with a warning)."""
    present = np.bincount(canonical, minlength=len(names)) > 0
    if not present.all():
        empty = [names[i] for i in np.flatnonzero(~present)]
        warnings.warn(
            f"MovieLens at {root}: {split_by} domain(s) {empty} have no ratings; dropped, "
            f"the remaining domain ids are re-indexed contiguously",
            stacklevel=3,
        )
    new_id = np.cumsum(present) - 1
    return new_id[canonical], [n for n, keep in zip(names, present, strict=True) if keep]


def _encode(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Index 1..n for the sorted distinct values (0 stays OOV) and the vocabulary."""
    uniq, inverse = np.unique(values, return_inverse=True)
    vocab = [OOV_TOKEN, *(str(v) for v in uniq.tolist())]
    return inverse.reshape(-1).astype(np.int64) + 1, vocab


def _check_options(split_by: str, features: Sequence[str], fractions: Sequence[float]) -> None:
    if split_by not in SPLIT_BY:
        raise DataError(f"unknown MovieLens split_by {split_by!r}; valid: {', '.join(SPLIT_BY)}")
    if isinstance(features, str):
        raise DataError(f"features must be a list of names, got the string {features!r}")
    unknown = [f for f in features if f not in FEATURES]
    if unknown:
        raise DataError(f"unknown MovieLens feature(s) {unknown}; valid: {', '.join(FEATURES)}")
    if not features or len(set(features)) != len(features):
        raise DataError(f"features must be non-empty and without repeats, got {list(features)}")
    check_fractions(fractions)


# ----------------------------------------------------------------------------- public


def build_movielens(
    root: str | Path,
    split_by: str,
    features: Sequence[str] = BASE_FEATURES,
    seed: int = 123,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    progress: bool | None = None,
) -> ProcessedData:
    """Read ML-1M or ML-100K from ``root`` and apply the MovieLens protocol (no caching).

    ``split_by`` is one of :data:`SPLIT_BY`; ``features`` lists the sparse fields
    in order, from ``("user", "item", "domain")`` plus any of
    :data:`EXTRA_FEATURES`. ``progress=None`` shows a bar only on a terminal.
    """
    _check_options(split_by, features, fractions)
    root = Path(root).expanduser().resolve()
    fmt = detect_format(root)
    users_file, ratings_file, items_file = format_files(root, fmt)
    bar = tqdm(total=5, desc=f"MovieLens {fmt}", unit="stage", disable=_disable(progress))
    try:
        bar.set_postfix_str("users")
        users = read_users(users_file, fmt)
        bar.update()
        bar.set_postfix_str("movies")
        item_ids = read_item_ids(items_file, fmt)
        bar.update()
        bar.set_postfix_str("ratings")
        table, user, item, rating = read_ratings(ratings_file, fmt)
        upos = lookup(table, users.ids, user, f"a user id listed in {users_file.name}")
        lookup(table, item_ids, item, f"a movie id listed in {items_file.name}")
        bar.update()

        bar.set_postfix_str("encode")
        names = _domain_names(fmt, split_by)
        domain, domain_names = _compact_domains(
            users.domains[split_by][upos], names, split_by, root
        )
        label = (rating == 5).astype(np.float32)
        columns, vocabularies = [], {}
        raw = {"user": user, "item": item, "domain": domain}
        for name in features:
            if name in raw:
                codes, vocab = _encode(raw[name])
            else:  # a user attribute: encode the (small) user table, then gather
                user_codes, vocab = _encode(getattr(users, name))
                codes = user_codes[upos]
            columns.append(codes)
            vocabularies[name] = vocab
        sparse = np.stack(columns, axis=1).astype(np.int64)
        bar.update()

        bar.set_postfix_str("split")
        codes = stratified_domain_split(domain, label, fractions, seed)
        splits = split_tensors(sparse, domain.astype(np.int64), label, codes)
        bar.update()
    finally:
        bar.close()

    return ProcessedData(
        fields=[FieldSpec(n, len(vocabularies[n])) for n in features],
        domain_names=list(domain_names),
        splits=splits,
        vocabularies=vocabularies,
        meta={
            "source": "movielens",
            "format": fmt,
            "root": str(root),
            "split_by": split_by,
            "features": list(features),
            "seed": seed,
            "fractions": [float(f) for f in fractions],
        },
    )


def prepare_movielens(
    root: str | Path,
    split_by: str,
    features: Sequence[str] = BASE_FEATURES,
    seed: int = 123,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    cache_dir: Path | None = None,
    progress: bool | None = None,
) -> ProcessedData:
    """:func:`build_movielens` through the on-disk cache (``cache_dir=None``: no cache).

    The cache key holds every protocol option and :data:`PROTOCOL_VERSION`; the
    raw files' names, sizes and mtimes are fingerprinted, so edited data is
    re-processed.
    """
    _check_options(split_by, features, fractions)
    root = Path(root).expanduser().resolve()
    fmt = detect_format(root)
    key = {
        "source": "movielens",
        "version": PROTOCOL_VERSION,
        "format": fmt,
        "root": str(root),
        "split_by": split_by,
        "features": list(features),
        "seed": seed,
        "fractions": [float(f) for f in fractions],
    }
    return load_or_build(
        cache_dir,
        key,
        list(format_files(root, fmt)),
        lambda: build_movielens(root, split_by, features, seed, fractions, progress),
        label=f"movielens-{fmt}-{split_by}",
    )


def _disable(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None = auto (off when not a TTY), else the opposite of ``progress``."""
    return None if progress is None else not progress
