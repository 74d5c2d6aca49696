"""Per-domain stratified split and the on-disk ProcessedData cache."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_mlora.data.cache import (
    cache_entry_dir,
    default_cache_dir,
    file_fingerprint,
    load_or_build,
)
from moe_mlora.data.processed import FieldSpec, ProcessedData, SplitTensors
from moe_mlora.data.splits import stratified_domain_split

# ----------------------------------------------------------------------------- splits


def _toy(n: int = 5000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    domain = rng.choice(5, n, p=[0.5, 0.2, 0.15, 0.1, 0.05])
    label = (rng.random(n) < np.array([0.1, 0.2, 0.3, 0.4, 0.5])[domain]).astype(np.float32)
    return domain, label


def test_split_group_sizes_are_exact():
    domain, label = _toy()
    codes = stratified_domain_split(domain, label)
    assert codes.dtype == np.int8 and set(np.unique(codes)) <= {0, 1, 2}
    for d in range(5):
        for y in (0.0, 1.0):
            group = codes[(domain == d) & (label == y)]
            n = len(group)
            expected = [round(0.6 * n), round(0.8 * n) - round(0.6 * n)]
            expected.append(n - sum(expected))
            assert np.bincount(group, minlength=3).tolist() == expected


def test_split_tiny_groups_and_custom_fractions():
    domain = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    label = np.array([0, 0, 1, 0, 0, 0, 0, 1, 1, 1])
    codes = stratified_domain_split(domain, label, fractions=(0.5, 0.25, 0.25), seed=7)
    # group (1, 0) has 4 rows: 2 / 1 / 1; group (1, 1) has 3: round(1.5)=2, round(2.25)-2=0, 1
    assert np.bincount(codes[(domain == 1) & (label == 0)], minlength=3).tolist() == [2, 1, 1]
    assert np.bincount(codes[(domain == 1) & (label == 1)], minlength=3).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="summing to 1"):
        stratified_domain_split(domain, label, fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="equal length"):
        stratified_domain_split(domain, label[:-1])


def test_split_is_stratified():
    domain, label = _toy(20_000)
    codes = stratified_domain_split(domain, label)
    for d in range(5):
        rates = [label[(domain == d) & (codes == s)].mean() for s in range(3)]
        n_val = ((domain == d) & (codes == 1)).sum()
        assert max(rates) - min(rates) < 2.0 / n_val  # equal up to one row's rounding


def test_split_is_seeded_and_random():
    domain, label = _toy()
    a = stratified_domain_split(domain, label, seed=123)
    assert np.array_equal(a, stratified_domain_split(domain, label, seed=123))
    b = stratified_domain_split(domain, label, seed=124)
    assert not np.array_equal(a, b)
    assert np.array_equal(np.bincount(a), np.bincount(b))  # same sizes, different rows
    assert len(stratified_domain_split(np.zeros(0), np.zeros(0))) == 0


def _sorting_split(domain, label, fractions, seed) -> np.ndarray:
    """The split as first written (np.unique twice, one lexsort): the reference."""
    n = len(domain)
    _, domain_idx = np.unique(domain, return_inverse=True)
    label_values, label_idx = np.unique(label, return_inverse=True)
    group = domain_idx.astype(np.int64) * len(label_values) + label_idx
    order = np.lexsort((np.random.Generator(np.random.PCG64(seed)).permutation(n), group))
    sorted_group = group[order]
    sizes = np.bincount(group)
    rank = np.arange(n) - np.concatenate(([0], np.cumsum(sizes)[:-1]))[sorted_group]
    cumulative = np.cumsum(fractions)
    codes_sorted = np.full(n, 2, dtype=np.int8)
    codes_sorted[rank < np.round(sizes * cumulative[1]).astype(np.int64)[sorted_group]] = 1
    codes_sorted[rank < np.round(sizes * cumulative[0]).astype(np.int64)[sorted_group]] = 0
    codes = np.empty(n, dtype=np.int8)
    codes[order] = codes_sorted
    return codes


@pytest.mark.parametrize(
    "case",
    [
        "toy",
        "negative domains",
        "sparse domain ids",
        "bool labels",
        "all positive",
        "soft labels",
        "string domains",
        "huge domain ids",
    ],
)
def test_split_equals_the_sorting_reference(case):
    rng = np.random.default_rng(7)
    domain, label = _toy(3000, seed=3)
    if case == "negative domains":
        domain = domain - 2
    elif case == "sparse domain ids":
        domain = np.array([3, 40, 41, 900, 65000])[domain]
    elif case == "bool labels":
        label = label > 0.5
    elif case == "all positive":
        label = np.ones_like(label)
    elif case == "soft labels":
        label = rng.choice([0.0, 0.25, 1.0], size=label.size)
    elif case == "string domains":
        domain = np.array(["b", "a", "z", "c", "q"])[domain]
    elif case == "huge domain ids":
        domain = domain * 10**9
    for fractions, seed in (((0.6, 0.2, 0.2), 123), ((0.8, 0.1, 0.1), 5)):
        expected = _sorting_split(domain, label, fractions, seed)
        assert np.array_equal(stratified_domain_split(domain, label, fractions, seed), expected)


def test_split_is_fast_on_a_million_rows():
    import time

    rng = np.random.default_rng(0)
    domain, label = rng.integers(0, 21, 1_000_000), rng.integers(0, 2, 1_000_000)
    start = time.perf_counter()
    stratified_domain_split(domain, label)
    assert time.perf_counter() - start < 2.0


# ----------------------------------------------------------------------------- cache


def _data(value: float = 1.0) -> ProcessedData:
    split = SplitTensors(
        sparse=torch.arange(6).reshape(3, 2),
        domain=torch.tensor([0, 1, 0]),
        label=torch.tensor([value, 0.0, 1.0]),
    )
    return ProcessedData(
        fields=[FieldSpec("user", 4), FieldSpec("item", 7)],
        domain_names=["a", "b"],
        splits={"train": split, "val": split, "test": split},
        vocabularies={"user": ["<oov>", "1", "2", "3"]},
        meta={"source": "toy"},
    )


class _Builder:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> ProcessedData:
        self.calls += 1
        return _data()


@pytest.fixture
def raw(tmp_path: Path) -> list[Path]:
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for f in files:
        f.write_text("x")
    return files


def test_cache_hit_skips_build(tmp_path, raw, caplog):
    build, cache = _Builder(), tmp_path / "cache"
    first = load_or_build(cache, {"k": 1}, raw, build, label="toy")
    with caplog.at_level(logging.INFO, logger="moe_mlora.data.cache"):
        second = load_or_build(cache, {"k": 1}, raw, build, label="toy")
    assert build.calls == 1
    assert "loaded cached" in caplog.text
    assert torch.equal(first.splits["train"].sparse, second.splits["train"].sparse)
    assert second.vocabularies == first.vocabularies and second.domain_names == ["a", "b"]
    entries = list((cache / "processed").iterdir())
    assert [e.name.split("-")[0] for e in entries] == ["toy"]
    assert len(entries[0].name) == len("toy-") + 16


def test_cache_invalidated_by_key_and_raw_files(tmp_path, raw):
    build, cache = _Builder(), tmp_path / "cache"
    load_or_build(cache, {"k": 1}, raw, build)
    load_or_build(cache, {"k": 2}, raw, build)
    assert build.calls == 2
    stat = raw[0].stat()
    os.utime(raw[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touch
    load_or_build(cache, {"k": 1}, raw, build)
    assert build.calls == 3
    load_or_build(cache, {"k": 1}, raw, build)
    assert build.calls == 3


def test_corrupt_entry_is_rebuilt(tmp_path, raw):
    build, cache = _Builder(), tmp_path / "cache"
    load_or_build(cache, {"k": 1}, raw, build)
    entry = cache_entry_dir(cache, {"k": 1}, raw)
    (entry / "data.pt").write_bytes(b"not a torch file")
    data = load_or_build(cache, {"k": 1}, raw, build)
    assert build.calls == 2 and len(data.splits["test"]) == 3
    load_or_build(cache, {"k": 1}, raw, build)
    assert build.calls == 2  # the rebuilt entry is good


def test_no_temp_dirs_left_and_no_cache_mode(tmp_path, raw):
    build, cache = _Builder(), tmp_path / "cache"
    load_or_build(cache, {"k": 1}, raw, build, label="x")
    load_or_build(cache, {"k": 2}, raw, build, label="x")
    names = [p.name for p in (cache / "processed").iterdir()]
    assert len(names) == 2 and not [n for n in names if n.startswith(".")]
    load_or_build(None, {"k": 1}, raw, build)
    load_or_build(None, {"k": 1}, raw, build)
    assert build.calls == 4


def test_failed_build_leaves_nothing(tmp_path, raw):
    def boom() -> ProcessedData:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        load_or_build(tmp_path / "cache", {"k": 1}, raw, boom)
    processed = tmp_path / "cache" / "processed"
    assert not processed.exists() or not list(processed.iterdir())


def test_fingerprint_and_default_dir(tmp_path, raw, monkeypatch):
    fp = file_fingerprint(raw)
    assert [f["name"] for f in fp] == ["a.txt", "b.txt"] and fp[0]["size"] == 1
    monkeypatch.setenv("MOE_MLORA_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MOE_MLORA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "moe_mlora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "moe_mlora"
