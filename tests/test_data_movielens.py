"""MovieLens reading and protocol, on generated ML-1M / ML-100K and the real ML-100K."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_mlora.data.movielens import (
    AGE_GROUPS,
    ML1M_OCCUPATIONS,
    ML100K_OCCUPATIONS,
    build_movielens,
    detect_format,
    prepare_movielens,
)
from moe_mlora.data.processed import OOV_INDEX, SPLITS, DataError


def _all(data) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    parts = [data.splits[s] for s in SPLITS]
    return (
        torch.cat([p.sparse for p in parts]),
        torch.cat([p.domain for p in parts]),
        torch.cat([p.label for p in parts]),
    )


def _check_split_sizes(data) -> None:
    """Every (domain, label) group is split round(0.6n) / round(0.8n)-round(0.6n) / rest."""
    for d in range(data.num_domains):
        for y in (0.0, 1.0):
            sizes = [int(((s.domain == d) & (s.label == y)).sum()) for s in data.splits.values()]
            n = sum(sizes)
            assert sizes[:2] == [round(0.6 * n), round(0.8 * n) - round(0.6 * n)]


def test_detect_format(ml1m_root, ml100k_root, tmp_path):
    assert detect_format(ml1m_root) == "ml-1m"
    assert detect_format(ml100k_root) == "ml-100k"
    with pytest.raises(DataError, match=r"no such folder.*users\.dat.*u\.data.*format=ml-100k"):
        detect_format(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "u.data").write_text("1\t1\t1\t1\n")
    with pytest.raises(DataError, match=r"found notes\.txt, u\.data.*missing u\.user, u\.item"):
        detect_format(tmp_path)


@pytest.mark.parametrize("root_fixture", ["ml1m_root", "ml100k_root"])
@pytest.mark.parametrize("split_by", ["gender", "age", "occupation"])
def test_protocol_on_generated(root_fixture, split_by, request):
    root = request.getfixturevalue(root_fixture)
    fmt = detect_format(root)
    data = build_movielens(root, split_by, progress=False)
    occupations = ML1M_OCCUPATIONS if fmt == "ml-1m" else ML100K_OCCUPATIONS
    names = {"gender": ["F", "M"], "age": list(AGE_GROUPS), "occupation": list(occupations)}
    assert data.domain_names == names[split_by]
    assert data.field_names == ["user", "item", "domain"]
    sparse, domain, label = _all(data)
    assert len(label) == 12_000
    assert torch.equal(domain.unique(), torch.arange(data.num_domains))
    assert 0.19 < float(label.mean()) < 0.23
    for split in data.splits.values():
        assert split.sparse.dtype == torch.int64 and split.domain.dtype == torch.int64
        assert split.label.dtype == torch.float32
    assert torch.equal(sparse[:, 2] - 1, domain)  # the domain field is the domain id
    for f, spec in enumerate(data.fields):
        assert data.vocabularies[spec.name][OOV_INDEX] == "<oov>"
        assert len(data.vocabularies[spec.name]) == spec.vocab_size
        assert int(sparse[:, f].min()) >= 1 and int(sparse[:, f].max()) < spec.vocab_size
    _check_split_sizes(data)
    assert data.meta == {
        "source": "movielens",
        "format": fmt,
        "root": str(Path(root).resolve()),
        "split_by": split_by,
        "features": ["user", "item", "domain"],
        "seed": 123,
        "fractions": [0.6, 0.2, 0.2],
    }


def test_vocabularies_follow_the_raw_ids(ml1m_root):
    data = build_movielens(ml1m_root, "gender", progress=False)
    lines = (ml1m_root / "ratings.dat").read_text(encoding="latin-1").splitlines()
    users = sorted({int(line.split("::")[0]) for line in lines})
    assert data.vocabularies["user"] == ["<oov>", *map(str, users)]
    # rows keep file order within each split: the first rating is the first row of its split
    user, item = (int(v) for v in lines[0].split("::")[:2])
    heads = [s.sparse[0, :2].tolist() for s in data.splits.values()]
    expected = [
        data.vocabularies["user"].index(str(user)),
        data.vocabularies["item"].index(str(item)),
    ]
    assert expected in heads


def test_extra_features_and_domain_without_field(ml1m_root, ml100k_root):
    feats = ("user", "item", "gender", "age", "occupation")
    data = build_movielens(ml1m_root, "gender", features=feats, progress=False)
    assert data.field_names == list(feats)
    assert data.vocabularies["gender"] == ["<oov>", "F", "M"]
    assert data.vocabularies["age"] == ["<oov>", "1", "18", "25", "35", "45", "50", "56"]
    assert data.vocabularies["occupation"][:4] == ["<oov>", "0", "1", "2"]
    sparse, domain, _ = _all(data)
    assert torch.equal(sparse[:, 2] - 1, domain)  # gender field and gender domain agree
    small = build_movielens(ml100k_root, "age", features=("item", "age"), progress=False)
    assert small.field_names == ["item", "age"] and small.num_domains == 7
    ages = np.array(small.vocabularies["age"][1:], dtype=int)
    assert (np.diff(ages) > 0).all()  # ML-100K ages in years, sorted numerically


def test_seed_and_determinism(ml100k_root):
    a = build_movielens(ml100k_root, "age", progress=False)
    b = build_movielens(ml100k_root, "age", progress=False)
    c = build_movielens(ml100k_root, "age", seed=5, progress=False)
    assert torch.equal(a.splits["val"].sparse, b.splits["val"].sparse)
    assert not torch.equal(a.splits["val"].sparse, c.splits["val"].sparse)


def test_bad_options(ml1m_root):
    with pytest.raises(DataError, match="gender, age, occupation"):
        build_movielens(ml1m_root, "zip")
    with pytest.raises(DataError, match=r"\['genre'\].*user, item, domain, gender"):
        build_movielens(ml1m_root, "age", features=("user", "genre"))
    with pytest.raises(DataError, match="repeats"):
        build_movielens(ml1m_root, "age", features=("user", "user"))


def test_prepare_uses_the_cache(ml1m_root, tmp_path, monkeypatch):
    first = prepare_movielens(ml1m_root, "age", cache_dir=tmp_path, progress=False)
    import moe_mlora.data.movielens as ml

    def fail(*args, **kwargs):
        raise AssertionError("should have been loaded from the cache")

    monkeypatch.setattr(ml, "build_movielens", fail)
    second = prepare_movielens(ml1m_root, "age", cache_dir=tmp_path, progress=False)
    assert torch.equal(first.splits["test"].sparse, second.splits["test"].sparse)
    assert second.meta == first.meta and second.domain_names == first.domain_names


def test_progress_bar(ml100k_root, capsys):
    build_movielens(ml100k_root, "gender", progress=False)
    assert capsys.readouterr().err == ""
    build_movielens(ml100k_root, "gender", progress=True)
    assert "MovieLens ml-100k" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input


def _copy_with_line(src: Path, dst: Path, name: str, line_no: int, text: str) -> Path:
    """Copy the dataset and replace (1-based) line ``line_no`` of ``name`` with ``text``."""
    shutil.copytree(src, dst)
    path = dst / name
    lines = path.read_text(encoding="latin-1").splitlines()
    lines[line_no - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding="latin-1")
    return dst


BAD_ML1M = [
    ("ratings.dat", "1::2::3", "4 fields"),
    ("ratings.dat", "x::2::3::978300760", "integer user id"),
    ("ratings.dat", "1::2::6::978300760", "rating from 1 to 5"),
    ("ratings.dat", "99999::2::3::978300760", "user id listed in users.dat"),
    ("ratings.dat", "1::99999::3::978300760", "movie id listed in movies.dat"),
    ("users.dat", "3::X::25::1::12345", "Gender F or M"),
    ("users.dat", "3::F::17::1::12345", "Age code"),
    ("users.dat", "3::F::25::21::12345", "Occupation code 0..20"),
    ("users.dat", "1::F::25::1::12345", "each UserID id once"),
    ("movies.dat", "7::Title", "3 fields"),
]
BAD_ML100K = [
    ("u.data", "1\t2\t0\t881250949", "rating from 1 to 5"),
    ("u.data", "1 2 3 881250949", "4 fields"),
    ("u.user", "4|23|M|astronaut|32067", "an occupation among"),
    ("u.user", "4|23|Q|writer|32067", "gender F or M"),
    ("u.user", "4|old|M|writer|32067", "integer age"),
    ("u.item", "5|x|y", "24 fields"),
]


@pytest.mark.parametrize(("name", "text", "expected"), BAD_ML1M)
def test_bad_ml1m_lines(ml1m_root, tmp_path, name, text, expected):
    root = _copy_with_line(ml1m_root, tmp_path / "d", name, 3, text)
    with pytest.raises(DataError) as info:
        build_movielens(root, "age", progress=False)
    message = str(info.value)
    assert f"{name}, line 3" in message and repr(text) in message and expected in message


@pytest.mark.parametrize(("name", "text", "expected"), BAD_ML100K)
def test_bad_ml100k_lines(ml100k_root, tmp_path, name, text, expected):
    root = _copy_with_line(ml100k_root, tmp_path / "d", name, 4, text)
    with pytest.raises(DataError) as info:
        build_movielens(root, "occupation", progress=False)
    message = str(info.value)
    assert f"{name}, line 4" in message and repr(text) in message and expected in message


def test_missing_file(ml1m_root, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(ml1m_root, root)
    (root / "movies.dat").unlink()
    with pytest.raises(DataError, match=r"ml-1m is missing movies\.dat.*generate movielens"):
        prepare_movielens(root, "age")


def test_empty_domain_is_dropped_with_a_warning(ml1m_root, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(ml1m_root, root)
    users = (root / "users.dat").read_text(encoding="latin-1")
    (root / "users.dat").write_text(re.sub(r"::1::(\d+)::", r"::18::\1::", users), "latin-1")
    with pytest.warns(UserWarning, match=r"age domain\(s\) \['<18'\] have no ratings"):
        data = build_movielens(root, "age", progress=False)
    assert data.domain_names == list(AGE_GROUPS[1:])
    _, domain, _ = _all(data)
    assert torch.equal(domain.unique(), torch.arange(6))


# ----------------------------------------------------------------------------- real ML-100K


@pytest.mark.parametrize(("split_by", "n_domains"), [("gender", 2), ("age", 7), ("occupation", 21)])
def test_real_ml100k(real_ml100k_root, split_by, n_domains):
    data = build_movielens(real_ml100k_root, split_by, progress=False)
    _, domain, label = _all(data)
    assert len(label) == 100_000
    assert data.fields[0].vocab_size == 943 + 1 and data.fields[1].vocab_size == 1682 + 1
    assert abs(float(label.mean()) - 0.2120) < 0.0005
    assert data.num_domains == n_domains
    assert torch.equal(domain.unique(), torch.arange(n_domains))
    _check_split_sizes(data)
    assert [len(data.splits[s]) for s in SPLITS] == pytest.approx([60_000, 20_000, 20_000], abs=25)
