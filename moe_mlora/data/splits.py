"""Per-domain, label-stratified train / val / test split.

The papers split *within each domain*, stratified by label, 60 / 20 / 20 with a
fixed seed. Splitting each (domain, label) group separately keeps every
domain's positive rate the same in train, val and test (up to rounding), so
per-domain AUCs are comparable across splits and small domains are never left
without positives in one split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from moe_mlora.data.processed import SPLITS, DataError, SplitTensors

TRAIN, VAL, TEST = 0, 1, 2


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """``(train, val, test)`` as floats; a DataError naming ``data.fractions`` otherwise."""
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
        raise DataError(
            "data.fractions must be three non-negative numbers (train, val, test) summing to 1, "
            f"got {list(fr)}"
        )
    return fr  # type: ignore[return-value]


def split_tensors(
    sparse: np.ndarray, domain: np.ndarray, label: np.ndarray, codes: np.ndarray
) -> dict[str, SplitTensors]:
    """Rows of each split code (see :func:`stratified_domain_split`) as contiguous tensors."""
    out = {}
    for code, name in enumerate(SPLITS):
        mask = codes == code
        out[name] = SplitTensors(
            sparse=torch.from_numpy(np.ascontiguousarray(sparse[mask])),
            domain=torch.from_numpy(np.ascontiguousarray(domain[mask])),
            label=torch.from_numpy(np.ascontiguousarray(label[mask])),
        )
    return out


def _value_index(values: np.ndarray) -> np.ndarray:
    """Each value's index among the sorted distinct values (``np.unique``'s inverse), as the
    smallest integer type that holds it: in O(n) for small integer ranges and 0/1 labels,
    which is every domain and label column (a 31M-row sort took seconds)."""
    if values.dtype.kind == "b":
        values = values.view(np.uint8)
    if values.dtype.kind in "iu":
        low, high = int(values.min()), int(values.max())
        if high - low < 1 << 16:
            present = np.bincount(values - low, minlength=high - low + 1) > 0
            lookup = (np.cumsum(present) - 1).astype(np.int32)
            return lookup[values - low]
    elif values.dtype.kind == "f":
        ones = values == 1
        if np.all(ones | (values == 0)):
            both = ones.any() and not ones.all()
            return ones.astype(np.int32) if both else np.zeros(values.shape, np.int32)
    return np.unique(values, return_inverse=True)[1].reshape(-1).astype(np.int64)


def stratified_domain_split(
    domain: np.ndarray,
    label: np.ndarray,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 123,
) -> np.ndarray:
    """Assign each row to train (0), val (1) or test (2), per (domain, label) group.

    Within a group of ``n`` rows, taken in a random order drawn from
    ``numpy.random.Generator(PCG64(seed))``, the first ``round(f0 * n)`` rows are
    train, the next ``round((f0 + f1) * n) - round(f0 * n)`` val and the rest
    test. The result depends only on ``seed`` and the row order of the inputs.
    Fully vectorised: one ``lexsort`` for all groups.

    Returns an ``int8`` array of split codes, one per row.
    """
    domain = np.asarray(domain)
    label = np.asarray(label)
    if domain.ndim != 1 or domain.shape != label.shape:
        raise ValueError(
            f"domain and label must be 1-D and of equal length, got {domain.shape}, {label.shape}"
        )
    fr = np.asarray(check_fractions(fractions))
    n = domain.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int8)

    domain_idx = _value_index(domain)
    label_idx = _value_index(label)
    group = domain_idx.astype(np.int64) * (int(label_idx.max()) + 1) + label_idx
    if group.max() < 1 << 15:  # numpy's stable sort is a radix sort for 16-bit integers
        group = group.astype(np.int16)

    # A random permutation as tie-free sort keys = a random order inside each group: the rows
    # in key order, then stably by group (the same order as lexsort((key, group)), faster).
    shuffle_key = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    by_key = np.empty(n, dtype=np.int64)
    by_key[shuffle_key] = np.arange(n)
    del shuffle_key
    order = by_key[np.argsort(group[by_key], kind="stable")]
    del by_key
    sorted_group = group[order]

    sizes = np.bincount(group)
    del group
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    rank = np.arange(n) - starts[sorted_group]  # position of each row inside its group

    # Python's round() and np.round both round half to even; keep that rule.
    cumulative = np.cumsum(fr)
    train_end = np.round(sizes * cumulative[0]).astype(np.int64)
    val_end = np.round(sizes * cumulative[1]).astype(np.int64)

    codes_sorted = np.full(n, TEST, dtype=np.int8)
    codes_sorted[rank < val_end[sorted_group]] = VAL
    codes_sorted[rank < train_end[sorted_group]] = TRAIN
    codes = np.empty(n, dtype=np.int8)
    codes[order] = codes_sorted
    return codes
