"""``data=table``: users' own CSV / parquet logs as a multi-domain CTR dataset."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from moe_mlora.config import compose
from moe_mlora.data import table
from moe_mlora.data.datamodule import table_source
from moe_mlora.data.processed import OOV_INDEX, SPLITS, DataError, ProcessedData
from moe_mlora.data.table import build_table, make_spec, prepare_table
from moe_mlora.pipeline.runner import train_and_evaluate

DOMAINS = ("north", "south", "west")


def make_logs(n: int = 3000, seed: int = 0) -> pl.DataFrame:
    """Clicks whose label depends on user x item taste and on the domain (3 domains).

    User ids are integers 1..150 (so numeric and text order differ: 9 < 10),
    items are strings, and ``category`` is an extra item attribute.
    """
    rng = np.random.default_rng(seed)
    users = rng.integers(1, 151, n)
    items = rng.integers(0, 120, n)
    domain = rng.choice(len(DOMAINS), n, p=[0.5, 0.3, 0.2])
    user_vec = rng.normal(size=(151, 4))
    item_vec = rng.normal(size=(120, 4))
    shift = np.array([-1.0, 0.0, 0.8])
    score = (user_vec[users] * item_vec[items]).sum(1) + shift[domain]
    label = (score + rng.normal(scale=0.5, size=n) > 0.5).astype(np.int64)
    return pl.DataFrame(
        {
            "user_id": users,
            "item_id": [f"i{k:03d}" for k in items],
            "domain": [DOMAINS[d] for d in domain],
            "label": label,
            "category": [f"c{k % 7}" for k in items],
            "split": [SPLITS[s] for s in np.where(np.arange(n) % 5 < 3, 0, np.arange(n) % 5 - 2)],
        }
    )


@pytest.fixture(scope="module")
def logs() -> pl.DataFrame:
    return make_logs()


@pytest.fixture(scope="module")
def csv_file(logs, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("table") / "logs.csv"
    logs.write_csv(path)
    return path


@pytest.fixture(scope="module")
def parquet_file(logs, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("table") / "logs.parquet"
    logs.write_parquet(path)
    return path


def build(path, **options) -> ProcessedData:
    seed = options.pop("seed", 123)
    return build_table(path, make_spec(**options), seed=seed, progress=False)


def assert_same(a: ProcessedData, b: ProcessedData) -> None:
    assert a.field_names == b.field_names
    assert [f.vocab_size for f in a.fields] == [f.vocab_size for f in b.fields]
    assert a.domain_names == b.domain_names
    assert a.vocabularies == b.vocabularies
    for name in SPLITS:
        for attr in ("sparse", "domain", "label"):
            assert torch.equal(getattr(a.splits[name], attr), getattr(b.splits[name], attr))


def decoded(data: ProcessedData, split: str, field: str) -> list[str]:
    """The raw values (as text) of ``field`` for the rows of ``split``, in order."""
    codes = data.splits[split].sparse[:, data.field_names.index(field)].tolist()
    return [data.vocabularies[field][c] for c in codes]


# ----------------------------------------------------------------------------- reading


def test_csv_and_parquet_give_identical_data(csv_file, parquet_file, logs):
    data = build(csv_file)
    assert_same(data, build(parquet_file))
    assert data.field_names == ["user", "item", "domain"]
    assert data.domain_names == list(DOMAINS)
    assert sum(len(s) for s in data.splits.values()) == logs.height
    users = data.vocabularies["user"]
    assert users[OOV_INDEX] == "<oov>"
    assert users[1:] == [str(u) for u in sorted(logs["user_id"].unique())]  # 9 before 10
    assert data.vocabularies["domain"] == ["<oov>", *DOMAINS]
    assert data.meta["source"] == "table" and data.meta["files"] == [str(csv_file)]


def test_glob_and_list_of_files_equal_one_file(csv_file, logs, tmp_path):
    parts = [logs.slice(0, 1000), logs.slice(1000, 1200), logs.slice(2200, None)]
    for i, part in enumerate(parts):
        if i == 1:
            part.write_parquet(tmp_path / f"part{i}.parquet")
        else:
            part.write_csv(tmp_path / f"part{i}.csv")
    whole = build(csv_file)
    assert_same(whole, build(str(tmp_path / "part*")))
    listed = [tmp_path / "part0.csv", str(tmp_path / "part1.*"), tmp_path / "part2.csv"]
    assert_same(whole, build(listed))


def test_extra_categorical_feature_columns(csv_file):
    data = build(csv_file, features=["user", "item", "category", "domain"])
    assert data.field_names == ["user", "item", "category", "domain"]
    assert data.vocabularies["category"] == ["<oov>", *(f"c{k}" for k in range(7))]
    assert data.fields[2].vocab_size == 8
    items = decoded(data, "train", "item")
    categories = decoded(data, "train", "category")
    assert all(c == f"c{int(i[1:]) % 7}" for i, c in zip(items, categories, strict=True))


def test_stratified_split_per_domain_sizes_and_determinism(csv_file):
    data = build(csv_file)
    for d in range(data.num_domains):
        rates = []
        for y in (0.0, 1.0):
            sizes = [int(((s.domain == d) & (s.label == y)).sum()) for s in data.splits.values()]
            n = sum(sizes)
            assert n > 0
            assert sizes[:2] == [round(0.6 * n), round(0.8 * n) - round(0.6 * n)]
        for s in data.splits.values():
            rates.append(float(s.label[s.domain == d].mean()))
        assert max(rates) - min(rates) < 0.02  # stratified: same positive rate in each split
    assert_same(data, build(csv_file))
    other = build(csv_file, seed=7)
    assert not torch.equal(other.splits["train"].sparse, data.splits["train"].sparse)


def test_split_column_is_respected(csv_file, logs):
    data = build(csv_file, split_col="split")
    for name in SPLITS:
        rows = logs.filter(pl.col("split") == name)
        assert len(data.splits[name]) == rows.height
        assert decoded(data, name, "user") == [str(u) for u in rows["user_id"]]
        assert decoded(data, name, "item") == rows["item_id"].to_list()
        assert data.splits[name].label.tolist() == rows["label"].cast(pl.Float32).to_list()


def test_domain_order_option(csv_file, logs):
    order = ["west", "north", "south"]
    data = build(csv_file, domains=order, features=["user", "item", "domain"])
    assert data.domain_names == order
    assert data.vocabularies["domain"] == ["<oov>", *order]
    train = data.splits["train"]
    names = [order[d] for d in train.domain.tolist()]
    assert decoded(data, "train", "domain") == names
    counts = train.domain_counts(3).tolist()
    total = logs["domain"].value_counts()
    share = {r["domain"]: r["count"] / logs.height for r in total.iter_rows(named=True)}
    for name, count in zip(order, counts, strict=True):
        assert count / len(train) == pytest.approx(share[name], abs=0.01)


def test_boolean_labels_and_custom_column_names(logs, csv_file, tmp_path):
    renamed = logs.rename({"user_id": "uid", "item_id": "iid", "domain": "country"})
    renamed = renamed.with_columns(click=pl.col("label") == 1).drop("label")
    path = tmp_path / "bools.parquet"
    renamed.write_parquet(path)
    data = build(path, user_col="uid", item_col="iid", domain_col="country", label_col="click")
    assert_same(data, build(csv_file))


def test_null_ids_error_or_map_to_oov(logs, tmp_path):
    path = tmp_path / "nulls.csv"
    logs.with_columns(
        user_id=pl.when(pl.int_range(pl.len()).is_in([4, 9])).then(None).otherwise("user_id")
    ).write_csv(path)
    with pytest.raises(DataError, match=r"nulls\.csv, row 5 \(line 6\).*'user_id'.*2 of 3,000"):
        build(path)
    data = build(path, null_as_oov=True)
    users = torch.cat([s.sparse[:, 0] for s in data.splits.values()])
    assert int((users == OOV_INDEX).sum()) == 2


# ----------------------------------------------------------------------------- errors


def write_bad(logs: pl.DataFrame, path: Path, row: int, column: str, value) -> Path:
    """``logs`` with ``column`` of 0-based ``row`` set to ``value`` (text), as CSV."""
    text = logs.with_columns(pl.col(column).cast(pl.String))
    text = text.with_columns(
        pl.when(pl.int_range(pl.len()) == row)
        .then(pl.lit(value))
        .otherwise(pl.col(column))
        .alias(column)
    )
    text.write_csv(path)
    return path


@pytest.mark.parametrize(
    ("column", "value", "options", "message"),
    [
        ("label", "2", {}, r"row 7 \(line 8\): column 'label' must be 0 or 1.*got '2'"),
        ("label", "yes", {}, r"row 7 \(line 8\): column 'label' must be 0 or 1.*'yes'"),
        ("label", None, {}, r"row 7 \(line 8\): column 'label'.*an empty value"),
        ("domain", None, {}, r"row 7 \(line 8\): column 'domain' must be a domain value"),
        ("split", "holdout", {"split_col": "split"}, r"row 7.*one of train, val, test.*holdout"),
        ("domain", "east", {"domains": list(DOMAINS)}, r"row 7.*one of data.domains.*'east'"),
    ],
)
def test_bad_values_name_file_column_row_and_value(logs, tmp_path, column, value, options, message):
    path = write_bad(logs, tmp_path / "bad.csv", 6, column, value)
    with pytest.raises(DataError, match=message) as error:
        build(path, **options)
    assert str(path) in str(error.value)


def test_missing_files_and_globs_are_named(csv_file, tmp_path):
    with pytest.raises(DataError, match=r"no such file .*nope\.csv.*holds logs\.csv"):
        build(csv_file.parent / "nope.csv")
    with pytest.raises(DataError, match=r"glob '.*\*\.parquet' matched no files"):
        build(str(tmp_path / "*.parquet"))
    with pytest.raises(DataError, match=r"is a folder.*\*\.parquet"):
        build(tmp_path)
    (tmp_path / "logs.tsv").write_text("a\tb\n")
    with pytest.raises(DataError, match=r"logs\.tsv: unsupported file type '\.tsv'"):
        build(tmp_path / "logs.tsv")
    with pytest.raises(DataError, match=r"data\.path is not set.*data\.path=/path/to/logs\.csv"):
        table_source(None)


def test_missing_columns_list_what_the_file_has(csv_file):
    with pytest.raises(DataError) as error:
        build(csv_file, user_col="uid", features=["user", "item", "domain", "brand"])
    text = str(error.value)
    assert str(csv_file) in text and "missing column(s) ['uid', 'brand']" in text
    assert "['user_id', 'item_id', 'domain', 'label', 'category', 'split']" in text


def test_bad_options(csv_file):
    with pytest.raises(DataError, match=r"data\.domains lists \['east'\].*present are"):
        build(csv_file, domains=["north", "east"])
    with pytest.raises(DataError, match="leak"):
        build(csv_file, features=["user", "label"])
    with pytest.raises(DataError, match="fractions"):
        build_table(csv_file, make_spec(), fractions=(0.5, 0.5, 0.5), progress=False)


def test_domain_missing_from_a_split_warns(logs, tmp_path):
    path = tmp_path / "gap.csv"
    logs.with_columns(
        split=pl.when((pl.col("domain") == "west") & (pl.col("split") == "val"))
        .then(pl.lit("train"))
        .otherwise("split")
    ).write_csv(path)
    with pytest.warns(UserWarning, match=r"\['west'\] have no rows in the val split"):
        data = build(path, split_col="split")
    assert int(data.splits["val"].domain_counts(3)[2]) == 0


# ----------------------------------------------------------------------------- caching


def test_cache_hit_and_rebuild_when_a_file_changes(logs, tmp_path, monkeypatch):
    path = tmp_path / "logs.csv"
    logs.write_csv(path)
    calls = []
    real = table.build_table
    monkeypatch.setattr(table, "build_table", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = tmp_path / "cache"

    def prepare() -> ProcessedData:
        return prepare_table(path, make_spec(), cache_dir=cache, progress=False)

    first = prepare()
    assert_same(first, prepare())
    assert len(calls) == 1
    entries = list((cache / "processed").iterdir())
    assert len(entries) == 1
    assert json.loads((entries[0] / "cache_key.json").read_text())["key"]["source"] == "table"

    logs.with_columns(label=1 - pl.col("label")).write_csv(path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    flipped = prepare()
    assert len(calls) == 2
    assert torch.equal(
        flipped.splits["test"].label.sum() + first.splits["test"].label.sum(),
        torch.tensor(float(len(first.splits["test"]))),
    )
    prepare_table(path, make_spec(features=["user", "item"]), cache_dir=cache, progress=False)
    assert len(calls) == 3  # an option is part of the key


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("method", ["base", "moe_mlora"])
def test_run_end_to_end_on_a_csv(method, csv_file, tmp_path):
    cfg = compose(
        [
            "data=table",
            f"data.path={csv_file}",
            "data.features=[user,item,category,domain]",
            f"method={method}",
            "model.hidden_units=[32,16]",
            "trainer.max_epochs=1",
            "logger.wandb.enabled=false",
            "progress=false",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ]
    )
    results = train_and_evaluate(cfg, tmp_path / "run")
    test = results["test"]
    assert set(test["per_domain"]) == set(DOMAINS)
    assert 0.0 <= test["wauc"] <= 1.0
    assert results["data"]["test"]["samples"] == 600
    kinds = [phase["kind"] for phase in results["phases"]]
    assert kinds == [phase["name"] for phase in results["schedule"]["phases"]]


def test_run_without_path_says_how_to_set_it(tmp_path):
    cfg = compose(["data=table", "logger.wandb.enabled=false", "progress=false"])
    with pytest.raises(DataError, match=re.escape("data.path is not set")):
        train_and_evaluate(cfg, tmp_path)
