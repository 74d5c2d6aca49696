"""Synthetic MovieLens generator and its command line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from moe_mlora.data.generate import main
from moe_mlora.data.movielens import build_movielens, detect_format
from moe_mlora.data.synthetic_movielens import generate_movielens

SMALL = ["--users", "300", "--items", "200", "--ratings", "8000"]


def _auc(score: np.ndarray, label: np.ndarray) -> float:
    rank = np.empty(len(score))
    rank[np.argsort(score, kind="stable")] = np.arange(1, len(score) + 1)
    pos = label.sum()
    return float((rank[label == 1].sum() - pos * (pos + 1) / 2) / (pos * (len(label) - pos)))


def _ratings(root) -> np.ndarray:
    """[user, item, rating, timestamp] rows of a generated ML-1M ratings.dat."""
    text = (root / "ratings.dat").read_text(encoding="latin-1").replace("::", " ")
    return np.loadtxt(text.splitlines(), dtype=np.int64)


def test_cli_writes_ml100k_that_loads(tmp_path):
    out = tmp_path / "ml100k"
    cmd = [sys.executable, "-m", "moe_mlora.data.generate", "movielens", "--format", "ml-100k"]
    subprocess.run([*cmd, "--out", str(out), *SMALL], check=True, capture_output=True)
    names = {"u.data", "u.user", "u.item", "u.occupation", "u.genre", "u.info", "README"}
    assert names <= {p.name for p in out.iterdir()}
    assert detect_format(out) == "ml-100k"
    assert (out / "u.info").read_text() == "300 users\n200 items\n8000 ratings\n"
    assert len((out / "u.occupation").read_text().split()) == 21
    item = (out / "u.item").read_bytes()
    assert any(ch in item for ch in (b"\xe9", b"\xf1", b"\xdc", b"\xe7"))  # Latin-1 titles
    data = build_movielens(out, "occupation", progress=False)
    assert sum(len(s) for s in data.splits.values()) == 8000


def test_main_ml1m_and_errors(tmp_path, capsys):
    assert main(["movielens", "--out", str(tmp_path / "a"), "--seed", "3", *SMALL]) == 0
    assert "wrote synthetic ml-1m" in capsys.readouterr().out
    assert detect_format(tmp_path / "a") == "ml-1m"
    with pytest.raises(SystemExit) as info:
        main(["movielens", "--out", str(tmp_path / "b"), "--ratings", "10"])
    assert info.value.code == 2 and "too few" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])
    with pytest.raises(SystemExit):
        main(["movielens", "--help"])
    assert "--ratings" in capsys.readouterr().out


def test_deterministic_and_safe(tmp_path):
    a = generate_movielens(tmp_path / "a", "ml-1m", 300, 200, 8000, seed=4)
    b = generate_movielens(tmp_path / "b", "ml-1m", 300, 200, 8000, seed=4)
    c = generate_movielens(tmp_path / "c", "ml-1m", 300, 200, 8000, seed=5)
    for name in ("users.dat", "movies.dat", "ratings.dat"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "ratings.dat").read_bytes() != (c / "ratings.dat").read_bytes()
    generate_movielens(a, "ml-1m", 300, 200, 8000, seed=6)  # re-generating over our own is fine
    real = tmp_path / "real"
    real.mkdir()
    (real / "u.data").write_text("1\t1\t5\t0\n")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        generate_movielens(real, "ml-100k")
    with pytest.raises(ValueError, match="format"):
        generate_movielens(tmp_path / "d", "ml-20m")


def test_planted_structure(ml1m_root):
    rows = _ratings(ml1m_root)
    user, item, rating = rows[:, 0], rows[:, 1], rows[:, 2]
    assert len(rows) == 12_000 and rating.min() == 1 and rating.max() == 5
    assert len(np.unique(user * 10_000 + item)) == len(rows)  # nobody rates a movie twice
    assert np.bincount(user).max() > 3 * np.bincount(user)[1:].min()  # uneven activity
    assert np.bincount(user)[1:].min() >= 5 and np.bincount(item)[1:].min() >= 3
    shares = np.bincount(rating, minlength=6)[1:] / len(rating)
    assert np.allclose(shares, [0.06, 0.11, 0.27, 0.35, 0.21], atol=0.01)
    genders = [line.split("::")[1] for line in (ml1m_root / "users.dat").read_text().splitlines()]
    assert 0.6 < genders.count("M") / len(genders) < 0.8


def test_labels_depend_on_user_item_and_domain(ml1m_root):
    """A count-based user + item model is clearly above chance; domains differ in rates."""
    data = build_movielens(ml1m_root, "age", progress=False)
    train, test = data.splits["train"], data.splits["test"]
    y, prior = train.label.numpy().astype(float), float(train.label.mean())

    def logit_rate(column: int) -> np.ndarray:
        keys, n = train.sparse[:, column].numpy(), data.fields[column].vocab_size
        rate = (np.bincount(keys, y, n) + 5 * prior) / (np.bincount(keys, minlength=n) + 5)
        return np.log(rate / (1 - rate))

    score = logit_rate(0)[test.sparse[:, 0]] + logit_rate(1)[test.sparse[:, 1]]
    assert _auc(score, test.label.numpy()) > 0.7
    rates = train.domain_positive_rates(data.num_domains)
    assert float(rates.max() - rates.min()) > 0.05


def test_generators_take_key_value_arguments_like_every_command(tmp_path, capsys):
    sizes = [
        f"{flag.lstrip('-')}={value}" for flag, value in zip(SMALL[::2], SMALL[1::2], strict=True)
    ]
    assert main(["movielens", "format=ml-100k", f"out={tmp_path / 'kv'}", *sizes]) == 0
    assert main(["movielens", "--format", "ml-100k", "--out", str(tmp_path / "flags"), *SMALL]) == 0
    assert (tmp_path / "kv/u.data").read_bytes() == (tmp_path / "flags/u.data").read_bytes()
    with pytest.raises(SystemExit):
        main(["movielens", f"out={tmp_path / 'x'}", "ratings=lots"])
    assert "invalid int value" in capsys.readouterr().err


def test_key_value_argv_reads_flags_lists_and_leaves_folders_alone():
    import argparse

    from moe_mlora.cli import key_value_argv

    parser = argparse.ArgumentParser(prog="demo")
    parser.add_argument("dirs", nargs="*")
    parser.add_argument("--models", nargs="+")
    parser.add_argument("--skip-default-run", action="store_true")
    parser.add_argument("--threads", type=int)
    argv = ["runs/data=a,seed=1", "models=dcn,wdl", "skip_default_run=true", "threads=1"]
    args = parser.parse_args(key_value_argv(parser, argv))
    assert args.dirs == ["runs/data=a,seed=1"] and args.models == ["dcn", "wdl"]
    assert args.skip_default_run is True and args.threads == 1
    assert key_value_argv(parser, ["skip_default_run=false"]) == []
    with pytest.raises(SystemExit, match="takes true or false"):
        key_value_argv(parser, ["skip_default_run=yes"])
