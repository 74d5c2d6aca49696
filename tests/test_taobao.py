"""Taobao CloudTheme: the loader's protocol and errors, the cache, the generator, full runs."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_mlora.config import compose
from moe_mlora.data import taobao
from moe_mlora.data.generate import main as generate_main
from moe_mlora.data.processed import DataError
from moe_mlora.data.synthetic_taobao import RAW_FILES, generate_taobao
from moe_mlora.data.taobao import build_taobao, prepare_taobao
from moe_mlora.data.taobao_source import taobao_source
from moe_mlora.models.features import FieldEmbeddings
from moe_mlora.pipeline.runner import train_and_evaluate

SMALL = {"n_themes": 12, "n_users": 300, "n_items": 250, "n_clicks": 6000, "dim": 16}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return generate_taobao(tmp_path_factory.mktemp("cloudtheme"), seed=3, **SMALL)


@pytest.fixture(scope="module")
def data(root):
    return build_taobao(root, 10, progress=False)


# ----------------------------------------------------------------------------- helpers


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def expected_clicks(root: Path) -> tuple[list[str], dict]:
    """The protocol's steps 1-2 in plain Python: theme order and the set of clicks per theme."""
    users = {r["user_id"] for r in read_rows(root / "user_embedding.csv")}
    items = {r["item_id"] for r in read_rows(root / "item_embedding.csv")}
    order, clicks = [], defaultdict(set)
    for r in read_rows(root / "theme_click_log.csv"):
        if r["user_id"] in users and r["item_id"] in items:
            if r["theme_id"] not in clicks:
                order.append(r["theme_id"])
            clicks[r["theme_id"]].add((r["user_id"], r["item_id"]))
    return order, clicks


def samples(data) -> list[tuple[str, str, str, int, str]]:
    """Every sample as (theme, user id, item id, label, split), raw ids decoded."""
    out = []
    users, items = data.vocabularies["user"], data.vocabularies["item"]
    for name, split in data.splits.items():
        for (u, i, _), d, y in zip(
            split.sparse.tolist(), split.domain.tolist(), split.label.tolist(), strict=True
        ):
            out.append((data.domain_names[d], users[u], items[i], int(y), name))
    return out


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def vec(seed: int, dim: int = 4) -> str:
    return " ".join(f"{v:.3f}" for v in np.random.default_rng(seed).normal(size=dim))


def handmade(tmp_path: Path, clicks: list[list], users=range(1, 9), items=range(100, 120)) -> Path:
    """A tiny CloudTheme folder: the given clicks, 4-d vectors for ``users`` and ``items``."""
    write_csv(tmp_path / "theme_click_log.csv", ["user_id", "item_id", "theme_id"], clicks)
    write_csv(tmp_path / "user_embedding.csv", ["user_id", "emb"], [[u, vec(u)] for u in users])
    write_csv(tmp_path / "item_embedding.csv", ["item_id", "emb"], [[i, vec(i)] for i in items])
    return tmp_path


def theme_clicks(theme: int, users=range(1, 5), items=range(100, 110), every: int = 2) -> list:
    return [[u, i, theme] for u in users for i in items if (u + i) % every == 0]


# ----------------------------------------------------------------------------- protocol


def test_themes_in_order_of_first_appearance(root, data):
    order, _ = expected_clicks(root)
    assert data.domain_names == order[:10]
    assert data.fields[2].vocab_size == 11
    for split in data.splits.values():
        assert torch.equal(split.sparse[:, 2], split.domain + 1)


def test_positives_are_the_deduplicated_clicks_with_vectors(root, data):
    _, clicks = expected_clicks(root)
    positives = defaultdict(set)
    count = 0
    for theme, user, item, label, _ in samples(data):
        if label:
            positives[theme].add((user, item))
            count += 1
    assert count == sum(len(v) for v in positives.values())  # no duplicates
    assert {t: positives[t] for t in data.domain_names} == {t: clicks[t] for t in data.domain_names}
    report = data.meta["report"]
    assert report["duplicate_clicks"] > 0 and report["clicks_without_vectors"] > 0


def test_negative_counts_and_that_none_is_a_clicked_item(root, data):
    _, clicks = expected_clicks(root)
    negatives = defaultdict(list)
    for theme, user, item, label, _ in samples(data):
        if not label:
            negatives[theme, user].append(item)
    for theme in data.domain_names:
        ratio = data.meta["ctr_ratio"][theme]
        assert 0.2 <= ratio <= 0.5
        theme_items = {i for _, i in clicks[theme]}
        per_user = defaultdict(set)
        for u, i in clicks[theme]:
            per_user[u].add(i)
        for user, clicked in per_user.items():
            sampled = negatives.pop((theme, user), [])
            available = len(theme_items) - len(clicked)
            assert len(sampled) == min(int(len(clicked) / ratio), available)
            assert len(set(sampled)) == len(sampled)
            assert set(sampled) <= theme_items - clicked
    assert not negatives  # every negative belongs to a user who clicked in that theme


def test_samplers_are_exact_and_uniform():
    """Both samplers give exact counts and a uniform choice: user 0 goes through rejection
    sampling, user 1 through the dense keys, user 2 gets every item it did not click."""
    user = np.repeat([0, 1, 2], [3, 150, 960])
    item = np.r_[0:3, 0:150, 40:1000]  # the theme's items are 0..999
    hits = {0: np.zeros(1000), 1: np.zeros(1000)}
    rng = np.random.default_rng(0)
    for _ in range(200):
        neg_u, neg_i = taobao.theme_negatives(user, item, 0.25, rng)
        assert np.bincount(neg_u).tolist() == [12, 600, 40]  # min(int(n / 0.25), available)
        assert set(neg_i[neg_u == 2].tolist()) == set(range(40))
        for u in hits:
            hits[u] += np.bincount(neg_i[neg_u == u], minlength=1000)
    for u, clicked, need in ((0, 3, 12), (1, 150, 600)):
        assert hits[u][:clicked].sum() == 0
        rates = hits[u][clicked:] / 200
        assert abs(rates.mean() - need / (1000 - clicked)) < 1e-9
        assert rates.std() < 0.05 and rates.min() > 0.5 * rates.mean() - 0.02


def test_split_fractions_are_stratified_per_theme(data):
    n = data.num_domains
    for label in (0.0, 1.0):
        counts = {
            name: torch.bincount(split.domain[split.label == label], minlength=n).numpy()
            for name, split in data.splits.items()
        }
        total = sum(counts.values())
        assert (np.abs(counts["train"] - np.round(0.6 * total)) <= 1).all()
        assert (np.abs(counts["val"] - np.round(0.2 * total)) <= 1).all()


def test_deterministic_for_a_seed_and_different_for_another(root, data):
    again = build_taobao(root, 10, progress=False)
    for name in data.splits:
        assert torch.equal(again.splits[name].sparse, data.splits[name].sparse)
        assert torch.equal(again.splits[name].label, data.splits[name].label)
    other = build_taobao(root, 10, seed=5, progress=False)
    assert not torch.equal(other.splits["train"].sparse, data.splits["train"].sparse)


def test_taobao10_themes_have_the_same_samples_inside_taobao12(root, data):
    wider = build_taobao(root, 12, progress=False)
    assert wider.domain_names[:10] == data.domain_names
    small = sorted(samples(data), key=lambda s: s[:4])
    large = sorted((s for s in samples(wider) if s[0] in data.domain_names), key=lambda s: s[:4])
    assert [s[:4] for s in small] == [s[:4] for s in large]


def test_pretrained_tables_hold_the_file_vectors(root, data):
    rows = {r["user_id"]: r["emb"] for r in read_rows(root / "user_embedding.csv")}
    user = data.fields[0]
    assert user.pretrained.shape == (user.vocab_size, 16)
    assert torch.equal(user.pretrained[0], torch.zeros(16))
    for index in (1, user.vocab_size - 1):
        expected = [float(v) for v in rows[data.vocabularies["user"][index]].split()]
        assert torch.allclose(user.pretrained[index], torch.tensor(expected))


def test_cache_hit_on_rerun_and_miss_when_a_raw_file_changes(root, tmp_path, monkeypatch):
    folder = tmp_path / "raw"
    shutil.copytree(root, folder)
    calls = []
    real = taobao.build_taobao
    monkeypatch.setattr(taobao, "build_taobao", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = prepare_taobao(folder, 10, cache_dir=tmp_path / "cache", progress=False)
    second = prepare_taobao(folder, 10, cache_dir=tmp_path / "cache", progress=False)
    assert len(calls) == 1
    assert torch.equal(first.splits["test"].sparse, second.splits["test"].sparse)
    assert torch.equal(first.fields[1].pretrained, second.fields[1].pretrained)
    log = folder / "theme_click_log.csv"
    log.write_text(log.read_text() + log.read_text().splitlines()[1] + "\n")  # a repeated click
    prepare_taobao(folder, 10, cache_dir=tmp_path / "cache", progress=False)
    assert len(calls) == 2


def test_wide_and_string_embedding_formats_give_the_same_tensors(root, data, tmp_path):
    folder = tmp_path / "wide"
    shutil.copytree(root, folder)
    for name, id_name in (("user_embedding.csv", "user_id"), ("item_embedding.csv", "item_id")):
        rows = read_rows(root / name)
        wide = [[r[id_name], *r["emb"].split()] for r in rows]
        write_csv(folder / name, [id_name, *(f"v{j}" for j in range(16))], wide)
    shutil.copy(root / "theme_click_log.csv", folder / "theme_click_log.csv")  # same mtime: moot
    other = build_taobao(folder, 10, progress=False)
    for a, b in zip(data.fields, other.fields, strict=True):
        assert (a.pretrained is None) == (b.pretrained is None)
        if a.pretrained is not None:
            assert torch.equal(a.pretrained, b.pretrained)
    for name in data.splits:
        assert torch.equal(data.splits[name].sparse, other.splits[name].sparse)


# ----------------------------------------------------------------------------- bad input


def test_missing_root_message_names_files_source_and_generator():
    with pytest.raises(DataError) as error:
        taobao_source(None, 10)
    message = str(error.value)
    assert all(name in message for name in RAW_FILES)
    assert "9716" in message and "moe_mlora.data.generate taobao" in message
    assert "generate_if_missing" in message


def test_missing_file_and_missing_column_are_named(tmp_path):
    folder = handmade(tmp_path, theme_clicks(1))
    (folder / "item_embedding.csv").unlink()
    with pytest.raises(DataError, match=r"missing item_embedding\.csv"):
        build_taobao(folder, 1)
    folder = handmade(tmp_path, theme_clicks(1))
    write_csv(folder / "theme_click_log.csv", ["user_id", "item", "theme_id"], [[1, 100, 1]])
    with pytest.raises(DataError, match=r"missing column.*item_id"):
        build_taobao(folder, 1)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("7,0.1 0.2 0.3", r"user_embedding.csv, line 8: expected 4 space-separated floats"),
        ("7,0.1 0.2 x 0.3", r"user_embedding.csv, line 8: expected 4 numbers"),
    ],
)
def test_bad_embedding_rows_name_file_and_line(tmp_path, row, message):
    folder = handmade(tmp_path, theme_clicks(1))
    lines = (folder / "user_embedding.csv").read_text().splitlines()
    lines[7] = row  # line 8 of the file: the 7th vector
    (folder / "user_embedding.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        build_taobao(folder, 1)


def test_bad_wide_embedding_row_names_file_and_line(tmp_path):
    folder = handmade(tmp_path, theme_clicks(1))
    rows = [[i, 0.1, 0.2, 0.3, 0.4] for i in range(100, 120)]
    rows[4][3] = "oops"
    write_csv(folder / "item_embedding.csv", ["item_id", "a", "b", "c", "d"], rows)
    with pytest.raises(DataError, match=r"item_embedding.csv, line 6: expected 4 numbers"):
        build_taobao(folder, 1)


def test_ids_without_vectors_are_counted_and_logged(tmp_path, caplog):
    clicks = [*theme_clicks(1), [99, 100, 1], [1, 999, 1], [98, 998, 1]]
    folder = handmade(tmp_path, clicks)
    with caplog.at_level(logging.WARNING, logger="moe_mlora.data.taobao"):
        data = build_taobao(folder, 1)
    report = data.meta["report"]
    assert report["clicks_without_vectors"] == 3
    assert report["clicks_without_user_vector"] == 2 and report["clicks_without_item_vector"] == 2
    assert "3 of" in caplog.text and "no vector" in caplog.text


def test_small_and_single_class_themes_are_left_out_with_a_warning(tmp_path):
    tiny = [[1, 100, 7], [2, 101, 7], [3, 100, 7]]  # 3 clicks
    one_class = [[5, i, 8] for i in range(100, 106)]  # one user clicked all 6 items: no negatives
    folder = handmade(tmp_path, theme_clicks(1) + tiny + one_class + theme_clicks(9))
    with pytest.warns(UserWarning, match=r"2 theme\(s\) left out") as record:
        data = build_taobao(folder, 4)
    message = str(record[0].message)
    assert "theme 7: 3 clicks" in message and "theme 8: no negatives" in message
    assert data.domain_names == ["1", "9"]
    assert set(data.meta["dropped_themes"]) == {"7", "8"}
    assert sorted(set(data.splits["train"].domain.tolist())) == [0, 1]


def test_more_themes_than_exist_says_how_many(tmp_path):
    folder = handmade(tmp_path, theme_clicks(1) + theme_clicks(2))
    with pytest.raises(DataError, match="only 2 themes"):
        build_taobao(folder, 3)


def test_duplicate_clicks_are_dropped(tmp_path):
    clicks = theme_clicks(1)
    folder = handmade(tmp_path, clicks + clicks[:5])
    data = build_taobao(folder, 1)
    assert data.meta["report"]["duplicate_clicks"] == 5
    assert sum(int(s.label.sum()) for s in data.splits.values()) == len(clicks)


# ----------------------------------------------------------------------------- model side


def test_freeze_pretrained_switch(root, tmp_path):
    frozen = taobao_source(str(root), 10, cache_dir=tmp_path, progress=False)
    emb = FieldEmbeddings(frozen.fields, 8)
    assert not any(p is emb.tables[0].table for p in emb.parameters())
    tuned = taobao_source(str(root), 10, freeze_pretrained=False, cache_dir=tmp_path)
    emb = FieldEmbeddings(tuned.fields, 8)
    assert isinstance(emb.tables[0].table, torch.nn.Parameter)
    assert torch.equal(emb.tables[0].table.detach(), tuned.fields[0].pretrained)
    assert emb.tables[0].proj.weight.shape == (8, 16)


# ----------------------------------------------------------------------------- generator


def test_generator_writes_the_five_files_in_the_real_format(root):
    assert {p.name for p in root.iterdir()} >= set(RAW_FILES)
    clicks = read_rows(root / "theme_click_log.csv")
    assert len(clicks) == SMALL["n_clicks"]
    assert list(clicks[0])[:3] == ["user_id", "item_id", "theme_id"]
    assert len({r["theme_id"] for r in clicks}) == SMALL["n_themes"]
    for name, id_name in (("user_embedding.csv", "user_id"), ("item_embedding.csv", "item_id")):
        rows = read_rows(root / name)
        assert list(rows[0]) == [id_name, "emb"]
        assert all(len(r["emb"].split(" ")) == 16 for r in rows)
        float(rows[0]["emb"].split()[0])
    pool = read_rows(root / "theme_item_pool.csv")
    assert list(pool[0]) == ["theme_id", "item_id"]
    clicked = {(r["theme_id"], r["item_id"]) for r in clicks}
    assert clicked <= {(r["theme_id"], r["item_id"]) for r in pool}  # clicks come from pools
    purchases = read_rows(root / "user_item_purchase_log.csv")
    assert list(purchases[0])[:2] == ["user_id", "item_id"]


def test_generator_cli_is_deterministic_and_never_overwrites(tmp_path, capsys):
    args = ["taobao", "--themes", "3", "--users", "50", "--items", "40", "--clicks", "500"]
    generate_main([*args, "--out", str(tmp_path / "a"), "--dim", "8", "--seed", "4"])
    generate_main([*args, "--out", str(tmp_path / "b"), "--dim", "8", "--seed", "4"])
    assert "wrote synthetic Taobao" in capsys.readouterr().out
    for name in RAW_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "theme_click_log.csv").write_text("user_id,item_id,theme_id\n")
    with pytest.raises(SystemExit):
        generate_main([*args, "--out", str(tmp_path / "real")])
    with pytest.raises(SystemExit):
        generate_main([*args, "--out", str(tmp_path / "c"), "--heterogeneity", "2"])


def test_heterogeneity_makes_themes_differ():
    """At h=0 every theme ranks a user's items alike; at h=1 theme mappings disagree."""
    from moe_mlora.data.synthetic_taobao import _theme_mappings

    same, _ = _theme_mappings(np.random.default_rng(0), 6, 0.0)
    assert np.allclose(same, np.eye(same.shape[1]))
    mixed, bias = _theme_mappings(np.random.default_rng(0), 6, 1.0)
    assert not np.allclose(mixed[0], mixed[1]) and np.abs(bias).sum() > 0


# ----------------------------------------------------------------------------- end to end


def tiny_run(cache: Path, *overrides: str) -> list[str]:
    return [
        "data=taobao10",
        "model.hidden_units=[16,8]",
        "trainer.max_epochs=1",
        "logger.wandb.enabled=false",
        "progress=false",
        f"paths.cache_dir={cache}",
        *overrides,
    ]


@pytest.mark.parametrize("method", ["base", "mlora", "moe_mlora"])
def test_taobao10_runs_end_to_end(method, root, tmp_path_factory, tmp_path):
    cache = tmp_path_factory.getbasetemp() / "taobao-cache"
    cfg = compose(tiny_run(cache, f"method={method}", f"data.root={root}"))
    results = train_and_evaluate(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "completed" and saved["run"]["data"] == "taobao10"
    assert len(saved["test"]["per_domain"]) == 10
    assert 0.5 < results["test"]["wauc"] <= 1.0


def test_generate_if_missing_without_root_and_into_an_empty_root(tmp_path):
    generator = [
        "data.generator.themes=10",
        "data.generator.users=150",
        "data.generator.items=120",
        "data.generator.clicks=2500",
        "data.generator.dim=8",
    ]
    cfg = compose(tiny_run(tmp_path / "cache", "data.generate_if_missing=true", *generator))
    results = train_and_evaluate(cfg, tmp_path / "run")
    assert len(results["test"]["per_domain"]) == 10
    assert len(list((tmp_path / "cache" / "generated").glob("taobao-*"))) == 1

    empty = tmp_path / "empty"
    empty.mkdir()
    taobao_source(str(empty), 10, True, {"themes": 10, "users": 150, "items": 120, "clicks": 2500})
    assert all((empty / name).is_file() for name in RAW_FILES)
    with pytest.raises(DataError, match="no such folder"):
        taobao_source(str(tmp_path / "absent"), 10)
