"""The DeepCTR-Torch parity benchmark: its summary maths, and the harness end to end."""

from __future__ import annotations

import importlib.util
import math

import pytest

from moe_mlora.bench import parity
from moe_mlora.bench.parity import RunRecord, compare, compare_moe, mean_std
from moe_mlora.data.synthetic_movielens import generate_movielens

HAS_DEEPCTR = importlib.util.find_spec("deepctr_torch") is not None


def record(library, auc, wauc, epochs, samples, seconds, phases=()):
    return RunRecord(
        library=library,
        model="deepfm",
        seed=1,
        test_auc=auc,
        test_wauc=wauc,
        epochs=epochs,
        best_epoch=epochs - 3,
        train_samples=samples,
        train_seconds=seconds,
        phases=list(phases),
    )


def test_mean_std_is_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    mean, std = mean_std([0.79])
    assert mean == 0.79 and math.isnan(std)
    assert all(math.isnan(v) for v in mean_std([]))


def test_compare_means_ratios_and_verdicts():
    ours = [
        record("ours", 0.788, 0.787, 10, 600_000, 4.0),  # 150k/s
        record("ours", 0.790, 0.789, 12, 720_000, 6.0),  # 120k/s
    ]
    theirs = [
        record("deepctr", 0.790, 0.789, 8, 480_000, 6.0),  # 80k/s
        record("deepctr", 0.792, 0.791, 9, 540_000, 9.0),  # 60k/s
    ]
    c = compare("deepfm", ours, theirs)
    assert c.ours.auc == pytest.approx((0.789, math.sqrt(2e-6)))
    assert c.theirs.wauc[0] == pytest.approx(0.790)
    assert c.ours.epochs == 11 and c.theirs.epochs == 8.5
    assert c.ours.samples_per_s == pytest.approx(135_000)
    assert c.theirs.samples_per_s == pytest.approx(70_000)
    assert c.auc_diff == pytest.approx(-0.002)
    assert c.speed_ratio == pytest.approx(135 / 70)
    assert c.accuracy_pass and c.speed_pass and c.passed

    worse = [record("ours", 0.786, 0.785, 10, 600_000, 6.0)]  # 100k/s
    c = compare("deepfm", worse, theirs)
    assert c.auc_diff == pytest.approx(-0.005)
    assert not c.accuracy_pass
    assert c.speed_ratio == pytest.approx(100 / 70) and not c.speed_pass
    row = parity.comparison_row(c)
    assert row[-2:] == ["FAIL", "FAIL"] and row[9] == "-0.0050"


def test_compare_moe_uses_all_phases_and_reports_the_slowest():
    phases = [
        {"kind": "backbone", "samples": 300_000, "seconds": 3.0},  # 100k/s
        {"kind": "experts", "samples": 300_000, "seconds": 1.0},  # 300k/s
        {"kind": "gate", "samples": 120_000, "seconds": 2.0},  # 60k/s
    ]
    moe = [record("ours-moe", 0.79, 0.79, 20, 720_000, 6.0, phases)]  # 120k/s
    theirs = [record("deepctr", 0.79, 0.79, 8, 480_000, 6.0)]  # 80k/s
    m = compare_moe("deepfm", moe, theirs)
    assert m.moe.samples_per_s == pytest.approx(120_000)
    assert m.ratio == pytest.approx(1.5) and m.passed
    assert m.slowest_phase == "gate"
    assert m.slowest_ratio == pytest.approx(60 / 80)
    slow = [record("ours-moe", 0.79, 0.79, 20, 720_000, 12.0, phases)]  # 60k/s
    assert not compare_moe("deepfm", slow, theirs).passed


def test_tables_render():
    ours = [record("ours", 0.79, 0.79, 10, 600_000, 4.0)]
    theirs = [record("deepctr", 0.79, 0.79, 10, 600_000, 8.0)]
    row = parity.comparison_row(compare("deepfm", ours, theirs))
    text = parity.text_table(parity.COMPARISON_HEADER, [row])
    assert "2.00x" in text and "PASS" in text
    md = parity.markdown_table(parity.COMPARISON_HEADER, [row])
    assert md.count("\n") == 2 and md.startswith("| backbone |")


def test_the_baselines_bench_runs_both_libraries_under_a_runs_default_allocator():
    from moe_mlora.bench import baselines
    from moe_mlora.config import compose

    assert baselines.parse_args([]).allocator == compose([]).allocator == "tuned"
    assert baselines.parse_args(["allocator=default"]).allocator == "default"


def test_allocator_is_glibc_default_for_both_unless_asked():
    assert parity.parse_args([]).allocator == "default"
    assert parity.parse_args(["--allocator", "tuned"]).allocator == "tuned"
    with pytest.raises(SystemExit):
        parity.parse_args(["--allocator", "jemalloc"])


def test_missing_deepctr_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("deepctr_torch"):
            raise ImportError("No module named 'deepctr_torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(SystemExit, match="make install-bench"):
        parity.main(["--models", "deepfm"])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPCTR, reason="deepctr-torch not installed (make install-bench)")
def test_parity_end_to_end_on_tiny_movielens(tmp_path, capsys):
    root = generate_movielens(
        tmp_path / "ml-100k", "ml-100k", n_users=120, n_items=100, n_ratings=3000, seed=3
    )
    output = tmp_path / "parity.md"
    parity.main(
        [
            "--root",
            str(root),
            "--models",
            "deepfm",
            "--seeds",
            "1",
            "--threads",
            "1",
            "--max-epochs",
            "2",
            "--experts",
            "2",
            "--moe-models",
            "deepfm",
            "--output",
            str(output),
        ]
    )
    printed = capsys.readouterr().out
    assert "parity with DeepCTR-Torch" in printed and "MoE-MLoRA (E = 2)" in printed
    text = output.read_text()
    assert "python -m moe_mlora.bench parity --root" in text
    assert "## How the comparison is made fair" in text
    assert "- Allocator: `default` for both libraries" in text
    assert "nproc" in text
    rows = [line for line in text.splitlines() if line.startswith("| deepctr ")]
    assert len(rows) == 1
    for library in ("deepctr", "ours", "ours-moe"):
        assert f"| {library} | deepfm | 1 |" in text


def test_baselines_bench_ratios_are_paired_with_each_seeds_deepctr_runs():
    from moe_mlora.bench.baselines import Speed, summary_rows

    # Each seed's bar is the mean of its two DeepCTR runs: 40, 50 and 80 samples/s.
    speeds = [
        Speed("deepctr", "gender", s, 100 * rate, 100.0)
        for s, rate in [(1, 38), (1, 42), (2, 50), (2, 50), (3, 70), (3, 90)]
    ]
    speeds += [
        Speed("star", "gender", s, 100 * rate, 100.0) for s, rate in [(1, 44), (2, 55), (3, 64)]
    ]  # per seed 1.10x, 1.10x, 0.80x
    speeds += [
        Speed("star", "age", s, 100 * rate, 100.0) for s, rate in [(1, 36), (2, 45), (3, 99)]
    ]  # per seed 0.90x, 0.90x, 1.24x
    rows = summary_rows(speeds, ["star"], ["gender", "age"])
    assert rows == [["star", "55 (1.10x)", "45 (0.90x)", "FAIL"]]  # medians over seeds


def test_baselines_bench_batch_ratios_are_paired_with_each_seeds_deepctr_runs():
    from moe_mlora.bench.baselines import Speed, batch_rows

    # Each seed's DeepCTR batch time is the mean of its runs: 10 ms and 20 ms.
    speeds = [
        Speed("deepctr", "gender", seed, 1, 1.0, ms / 1e3)
        for seed, ms in [(1, 9.0), (1, 11.0), (2, 20.0), (2, 20.0)]
    ]
    speeds += [
        Speed("mmoe", "gender", 1, 1, 1.0, 0.0125),
        Speed("mmoe", "gender", 2, 1, 1.0, 0.016),
    ]
    assert batch_rows(speeds, ["mmoe"], ["gender"]) == [["mmoe", "14.25 (1.02x)"]]  # 0.8x, 1.25x


def test_step_times_record_every_optimizer_step_inside_the_block_only():
    import torch

    from moe_mlora.bench.baselines import median_interval, step_times

    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    with step_times() as times:
        for _ in range(3):
            weight.grad = torch.ones(2)
            optimizer.step()
    optimizer.step()  # after the block: not recorded
    assert len(times) == 3 and times == sorted(times)
    assert median_interval([0.0, 1.0, 3.0, 3.5]) == 1.0  # intervals 1, 2 and 0.5
    assert math.isnan(median_interval(times[:1]))  # no interval


@pytest.mark.skipif(not HAS_DEEPCTR, reason="deepctr-torch not installed (make install-bench)")
def test_baselines_bench_end_to_end_on_tiny_movielens(tmp_path, capsys):
    from moe_mlora.bench import baselines

    root = generate_movielens(
        tmp_path / "ml-100k", "ml-100k", n_users=120, n_items=100, n_ratings=3000, seed=3
    )
    output = tmp_path / "speed.md"
    baselines.main(
        [f"root={root}", "methods=base,star", "splits=gender", "seeds=1", "threads=1",
         "max_epochs=1", f"output={output}"]
    )  # fmt: skip
    assert "against DeepCTR-Torch's DeepFM" in capsys.readouterr().out
    text = output.read_text()
    assert "python -m moe_mlora.bench baselines root=" in text
    assert "- allocator: `tuned` for both libraries" in text  # a run's default
    assert "## Per training batch" in text
    assert [line.split(" |")[0] for line in text.splitlines() if line.startswith("| ")] == [
        "| method", "| base", "| star", "| method", "| base", "| star",
    ]  # fmt: skip
