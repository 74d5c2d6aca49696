"""python -m moe_mlora.report on hand-made results.json files with known numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest

from moe_mlora.reporting.report import domain_summary, find_results, load_runs, main, summarize

DOMAINS = {"a": 100, "b": 50}  # domain -> test samples


def write_run(
    root: Path,
    method: str,
    seed: int,
    wauc: float,
    aucs: tuple[float, float],
    experts: int | None = None,
    data: str = "toy",
    overrides: list[str] | None = None,
    phases: list[dict] | None = None,
) -> Path:
    """A completed run's results.json; other metrics follow from wauc, overheads from experts.
    ``phases``: the run's phase records (a validation WAUC for the report to derive)."""
    folder = root / f"method={method},experts={experts},seed={seed}"
    folder.mkdir(parents=True)
    overhead = 100 * (experts or 0) if method != "base" else 0
    test = {
        "wauc": wauc,
        "mean_auc": wauc - 0.01,
        "auc": wauc + 0.01,
        "logloss": 0.45,
        "per_domain": {
            name: {"auc": auc, "samples": samples, "positive_rate": 0.2}
            for (name, samples), auc in zip(DOMAINS.items(), aucs, strict=True)
        },
        "undefined_domains": [],
    }
    if experts:
        first = [0.75] + [0.25 / (experts - 1)] * (experts - 1)
        test["gate_weights"] = {"a": first, "b": first[::-1]}
    record = {
        "status": "completed",
        "run": {
            "name": f"{data}-deepfm-{method}-s{seed}",
            "output_dir": str(folder),
            "data": data,
            "model": "deepfm",
            "method": method,
            "experts": experts,
            "seed": seed,
            "overrides": overrides or [f"method={method}", f"seed={seed}"],
        },
        "parameters": {
            "backbone": 1000,
            "adapter_overhead": overhead,
            "adapter_overhead_pct": overhead / 10,
        },
        "flops": {"overhead_pct": 5.0 * (experts or 0)},
        "test": test,
        "wall_time_s": 10.0 + seed,
        "phases": phases or [],
    }
    (folder / "results.json").write_text(json.dumps(record))  # NaN written as JSON NaN
    return folder


def write_failed(root: Path) -> Path:
    folder = root / "method=moe_mlora,experts=8,seed=1"
    folder.mkdir(parents=True)
    record = {
        "status": "failed",
        "run": {
            "name": "toy-deepfm-moe_mlora-s1",
            "data": "toy",
            "model": "deepfm",
            "method": "moe_mlora",
            "experts": None,
            "seed": 1,
        },
        "error": {
            "type": "FloatingPointError",
            "message": "loss is nan in phase 2\ndetails",
            "traceback": "Traceback ...",
        },
        "wall_time_s": 3.2,
    }
    (folder / "results.json").write_text(json.dumps(record))
    return folder


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """3 seeds of base, moe_mlora e2 and e4, and one failed run; domain b's AUC NaN once."""
    root = tmp_path_factory.mktemp("multirun") / "10-00-00"
    for seed, wauc, a, b in [
        (1, 0.70, 0.69, 0.60),
        (2, 0.72, 0.71, math.nan),
        (3, 0.74, 0.73, 0.64),
    ]:
        write_run(root, "base", seed, wauc, (a, b))
    for seed, wauc in [(1, 0.73), (2, 0.74), (3, 0.75)]:
        write_run(root, "moe_mlora", seed, wauc, (0.75, 0.65), experts=2)
        write_run(root, "moe_mlora", seed, 0.76, (0.77, 0.66), experts=4)
    write_failed(root)
    return root


@pytest.fixture(scope="module")
def report(sweep) -> tuple[Path, str]:
    """The report written by the CLI into the default folder, and what it printed."""
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([str(sweep)]) == 0
    return sweep / "report", stdout.getvalue()


def test_groups_have_known_means_stds_and_deltas(sweep):
    summary = summarize(load_runs(find_results([sweep])))

    rows = summary.select("method", "experts", "n").rows()
    assert rows == [("base", None, 3), ("moe_mlora", 2, 3), ("moe_mlora", 4, 3)]
    assert summary["wauc_mean"].to_list() == pytest.approx([0.72, 0.74, 0.76])
    assert summary["wauc_std"].to_list() == pytest.approx([0.02, 0.01, 0.0], abs=1e-12)
    assert summary["delta_wauc_vs_base"].to_list() == pytest.approx([0.0, 0.02, 0.04])
    assert summary["mean_auc"].to_list() == pytest.approx([0.71, 0.73, 0.75])
    assert summary["adapter_overhead"].to_list() == [0, 200, 400]
    assert summary["adapter_overhead_pct"].to_list() == pytest.approx([0.0, 20.0, 40.0])
    assert summary["flops_overhead_pct"].to_list() == pytest.approx([0.0, 10.0, 20.0])
    assert summary["wall_time_s"].to_list() == pytest.approx([12.0, 12.0, 12.0])


def test_nan_domain_auc_is_left_out_of_that_domains_mean(sweep):
    domains = domain_summary(load_runs(find_results([sweep])))
    base = domains.filter(pl.col("method") == "base")

    assert base.select("domain", "n", "test_samples").rows() == [("a", 3, 100), ("b", 2, 50)]
    assert base["auc_mean"].to_list() == pytest.approx([0.71, 0.62])
    assert base["auc_std"].to_list() == pytest.approx([0.02, math.sqrt(0.0008)])


def test_csvs_hold_the_group_and_domain_tables(report):
    out, _ = report
    table = pl.read_csv(out / "report.csv")
    assert table.height == 3
    assert table.columns[:7] == ["data", "model", "method", "experts", "n", "wauc_mean", "wauc_std"]
    assert table["delta_wauc_vs_base"].to_list() == pytest.approx([0.0, 0.02, 0.04])

    domains = pl.read_csv(out / "report_domains.csv")
    assert domains.columns == [
        "data",
        "model",
        "method",
        "experts",
        "domain",
        "n",
        "auc_mean",
        "auc_std",
        "test_samples",
    ]
    e4 = domains.filter(pl.col("experts") == 4)
    assert e4.select("domain", "n").rows() == [("a", 3), ("b", 3)]
    assert e4["auc_mean"].to_list() == pytest.approx([0.77, 0.66])


def test_markdown_has_tables_plots_and_the_failed_run(report):
    out, printed = report
    text = (out / "report.md").read_text()

    assert "10 runs (9 completed, 1 failed)" in text
    assert "0.7200 ± 0.0200 (3)" in text
    assert "+0.0400" in text
    assert "| deepfm | moe_mlora e2 | 0.7500 | 0.6500 |" in text
    assert "method=moe_mlora,experts=8,seed=1" in text
    assert "FloatingPointError" in text
    assert "loss is nan in phase 2" in text
    assert "details" not in text  # only the message's first line
    for name in [
        "wauc_vs_experts_toy",
        "domain_auc_toy",
        "gate_weights_toy_deepfm_e2",
        "gate_weights_toy_deepfm_e4",
    ]:
        png = out / f"{name}.png"
        assert png.stat().st_size > 0
        assert f"]({name}.png)" in text
    assert "report.csv" in printed
    assert "0.7600 ± 0.0000 (3)" in printed


def test_two_expert_counts_give_two_rows_without_base(tmp_path):
    write_run(tmp_path, "moe_mlora", 1, 0.75, (0.7, 0.6), experts=2)
    write_run(tmp_path, "moe_mlora", 1, 0.77, (0.7, 0.6), experts=4)

    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    table = pl.read_csv(tmp_path / "out/report.csv")
    assert table.select("experts", "n").rows() == [(2, 1), (4, 1)]
    assert all(math.isnan(v) for v in table["wauc_std"])  # one run: no std
    assert all(math.isnan(v) for v in table["delta_wauc_vs_base"])  # no base runs


def test_plots_without_their_data_are_skipped(tmp_path):
    write_run(tmp_path, "base", 1, 0.7, (0.7, 0.6))

    assert main([str(tmp_path)]) == 0
    pngs = sorted(path.name for path in (tmp_path / "report").glob("*.png"))
    assert pngs == ["domain_auc_toy.png"]  # no moe_mlora: no WAUC-vs-experts, no heatmaps
    assert "## Failed runs\n\nNone." in (tmp_path / "report/report.md").read_text()


def test_groups_mixing_other_overrides_are_warned_about(tmp_path, capsys):
    write_run(tmp_path, "base", 1, 0.7, (0.7, 0.6), overrides=["optimizer.lr=0.1", "seed=1"])
    write_run(tmp_path, "base", 2, 0.7, (0.7, 0.6), overrides=["optimizer.lr=0.01", "seed=2"])

    assert main([str(tmp_path)]) == 0
    assert "warning: group toy/deepfm/base/None: optimizer.lr=0.01 vs" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("missing", "does not exist"),
        ("empty", "no results.json under"),
        ("bad-json", "bad/results.json: not valid JSON"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, setup, expected):
    target = tmp_path / "sweep"
    if setup != "missing":
        target.mkdir()
    if setup == "bad-json":
        (target / "bad").mkdir()
        (target / "bad/results.json").write_text('{"status": "compl')

    assert main([str(target)]) == 2
    err = capsys.readouterr().err
    assert "moe_mlora.report: error: " in err.splitlines()[-1]
    assert expected in err
    assert "Traceback" not in err
    if setup == "empty":
        assert "multirun/DATE/TIME" in err


def test_help_shows_usage_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "python -m moe_mlora.report multirun/" in capsys.readouterr().out


@pytest.mark.slow
def test_wandb_offline_writes_a_run_folder_under_out(tmp_path, monkeypatch):
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")  # restored after the test
    runs = tmp_path / "sweep"
    write_run(runs, "base", 1, 0.7, (0.7, 0.6))
    write_run(runs, "moe_mlora", 1, 0.75, (0.7, 0.6), experts=2)

    assert main([str(runs), "--out", str(tmp_path / "out"), "--wandb"]) == 0
    offline = list((tmp_path / "out/wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert list(offline[0].glob("*.wandb"))


def test_schedules_are_separate_groups_and_gate_diagnostics_are_reported(tmp_path):
    """moe_mlora runs are grouped by schedule (moe_mlora/warm...); older runs stay moe_mlora."""
    import json as json_module

    for schedule, own in (("paper", 0.3), ("warm", 0.9), (None, 0.5)):
        folder = write_run(tmp_path, "moe_mlora", 1, 0.75, (0.7, 0.6), experts=2)
        record = json_module.loads((folder / "results.json").read_text())
        if schedule is not None:
            record["run"]["schedule"] = schedule
        record["test"]["gate_diagnostics"] = {
            "per_domain": {
                "a": {"own_weight": own, "entropy": 0.1},
                "b": {"own_weight": own - 0.2, "entropy": 0.3},
            }
        }
        target = tmp_path / f"run-{schedule}"
        target.mkdir()
        (target / "results.json").write_text(json_module.dumps(record))
        (folder / "results.json").unlink()
        folder.rmdir()
    runs = load_runs(find_results([tmp_path]))
    methods = summarize(runs)["method"].to_list()
    assert methods == ["moe_mlora", "moe_mlora/paper", "moe_mlora/warm"]
    report = main([str(tmp_path), "--out", str(tmp_path / "report")])
    assert report == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "### Gate diagnostics" in text
    assert "| deepfm | moe_mlora/warm e2 | 0.8000 | 0.200 | b (0.7000) |" in text
    assert (tmp_path / "report" / "report_gate.csv").is_file()


def test_paired_difference_against_mlora_is_per_seed(tmp_path):
    for seed, (mlora, moe) in enumerate([(0.70, 0.71), (0.72, 0.74), (0.74, 0.75)], start=1):
        write_run(tmp_path, "mlora", seed, mlora, (0.7, 0.6))
        write_run(tmp_path, "moe_mlora", seed, moe, (0.7, 0.6), experts=2)
    write_run(tmp_path, "base", 4, 0.60, (0.6, 0.5))  # no MLoRA run of seed 4: not paired
    summary = summarize(load_runs(find_results([tmp_path])))
    row = summary.filter(summary["method"] == "moe_mlora").row(0, named=True)
    assert row["delta_wauc_vs_mlora"] == pytest.approx(0.04 / 3)
    assert row["delta_wauc_vs_mlora_std"] == pytest.approx(0.005773503, rel=1e-6)
    assert row["paired_seeds"] == 3
    base = summary.filter(summary["method"] == "base").row(0, named=True)
    assert math.isnan(base["delta_wauc_vs_mlora"])
    main([str(tmp_path), "--out", str(tmp_path / "report")])
    assert "| +0.0133 ± 0.0058 (3) |" in (tmp_path / "report" / "report.md").read_text()


# ------------------------------------------------------------ careless inputs
def test_keys_that_do_not_change_results_are_not_a_difference(tmp_path, capsys):
    write_run(tmp_path, "base", 1, 0.7, (0.7, 0.6), overrides=["threads=1", "seed=1"])
    write_run(
        tmp_path, "base", 2, 0.7, (0.7, 0.6),
        overrides=["threads=2", "progress=false", "data.root=/elsewhere", "seed=2"],
    )  # fmt: skip
    assert main([str(tmp_path)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_group_mixing_epoch_caps_says_so_in_its_row(tmp_path, capsys):
    write_run(tmp_path, "base", 1, 0.7, (0.7, 0.6), overrides=["trainer.max_epochs=5", "seed=1"])
    write_run(tmp_path, "base", 2, 0.7, (0.7, 0.6), overrides=["trainer.max_epochs=50", "seed=2"])
    assert main([str(tmp_path)]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "5 / 50 (mixed!)" in report
    assert "averages runs with different trainer.max_epochs (5 / 50)" in report
    summary = (tmp_path / "report" / "report.csv").read_text()
    assert "5 / 50" in summary


def test_a_run_that_did_not_record_its_epoch_cap_makes_no_group_mixed(tmp_path, capsys):
    write_run(tmp_path, "base", 1, 0.7, (0.7, 0.6), overrides=["trainer.max_epochs=50", "seed=1"])
    write_run(tmp_path, "base", 2, 0.7, (0.7, 0.6), overrides=["seed=2"])  # cap not recorded
    write_run(tmp_path, "mlora", 1, 0.7, (0.7, 0.6), overrides=["seed=1"])
    assert main([str(tmp_path)]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "mixed" not in report and "different trainer.max_epochs" not in report
    rows = pl.read_csv(tmp_path / "report" / "report.csv").select("method", "max_epochs").rows()
    assert sorted(rows) == [("base", "50"), ("mlora", "?")]


def test_foreign_truncated_and_debug_results_are_skipped_and_listed(tmp_path, capsys):
    write_run(tmp_path, "base", 1, 0.7, (0.7, 0.6))
    for name, text in [
        ("truncated", '{"status": "compl'),
        ("foreign", '{"name": "some other tool"}'),
        ("a_list", "[1, 2]"),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(text)
    debug = write_run(tmp_path, "mlora", 1, 0.9, (0.9, 0.9))
    record = json.loads((debug / "results.json").read_text())
    record["run"]["debug"] = "fdr"
    (debug / "results.json").write_text(json.dumps(record))

    assert main([str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert err.count("moe_mlora.report: skipped") == 4
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Skipped files" in report and "a debug run (debug=fdr)" in report
    assert ",mlora," not in (tmp_path / "report" / "report.csv").read_text()


def test_the_validation_choice_follows_validation_not_test(tmp_path):
    """★ marks the highest validation WAUC of a (data, model), here not the best on test; the
    tested model's validation WAUC comes from the last kept phase of files without it."""
    write_run(tmp_path, "base", 1, 0.75, (0.75, 0.75), phases=[{"best_val_wauc": 0.71}])
    write_run(tmp_path, "mlora", 1, 0.80, (0.8, 0.8), phases=[{"best_val_wauc": 0.70}])
    not_kept = {"best_val_wauc": 0.90, "kept": False}  # the run's best came back
    joint = {"best_val_wauc": 0.65, "best_val": {"wauc": 0.72, "mean_auc": 0.7}}
    write_run(tmp_path, "moe_mlora", 1, 0.78, (0.78, 0.78), experts=2, phases=[joint, not_kept])
    summary = summarize(load_runs(find_results([tmp_path])))
    chosen = summary.filter(pl.col("validation_choice"))
    assert chosen["method"].to_list() == ["moe_mlora"]
    assert dict(zip(summary["method"], summary["val_wauc"], strict=True)) == pytest.approx(
        {"base": 0.71, "mlora": 0.70, "moe_mlora": 0.72}
    )
    assert main([str(tmp_path), f"out={tmp_path / 'report'}"]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| 0.7200 ★ |" in report and "| 0.7000 |" in report


# ------------------------------------------------------------- the typed record
def test_the_results_schema_round_trips():
    from moe_mlora.pipeline.schema import SCHEMA_VERSION, RunInfo, RunRecord

    record = RunRecord(
        status="completed",
        run=RunInfo(name="toy-deepfm-base-s1", data="toy", model="deepfm", method="base", seed=1),
        parameters={"backbone": 10},
        test={"wauc": 0.7, "mean_auc": 0.69, "auc": 0.71, "logloss": 0.45, "per_domain": {}},
        wall_time_s=1.5,
    )
    values = json.loads(json.dumps(record.to_json()))
    assert values["schema_version"] == SCHEMA_VERSION and "error" not in values
    assert RunRecord.from_json(values) == record


def test_a_version_one_results_json_still_reports(tmp_path):
    """A record from before schedules, hyperparameters and schema_version existed."""
    folder = tmp_path / "old"
    folder.mkdir()
    old = {
        "status": "completed",
        "run": {"name": "toy-deepfm-moe_mlora-s1", "data": "toy", "model": "deepfm",
                "method": "moe_mlora", "experts": 2, "seed": 1, "overrides": ["seed=1"]},
        "parameters": {"backbone": 100, "adapter": 10, "gate": 2, "total": 112,
                       "adapter_overhead": 12, "adapter_overhead_pct": 12.0},
        "test": {"wauc": 0.7, "mean_auc": 0.69, "auc": 0.71, "logloss": 0.45,
                 "per_domain": {"a": {"auc": 0.7, "samples": 10, "positive_rate": 0.2}}},
        "wall_time_s": 3.0,
    }  # fmt: skip
    (folder / "results.json").write_text(json.dumps(old))
    from moe_mlora.pipeline.schema import RunRecord

    record = RunRecord.from_json(old)
    assert record.schema_version == 1 and record.run.schedule is None and record.run.debug is None
    assert main([str(tmp_path)]) == 0
    assert "moe_mlora" in (tmp_path / "report" / "report.csv").read_text()


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ([1, 2], "no 'run' section"),
        ({"run": {}, "status": "finished"}, "unknown status"),
        ({"run": {}, "status": "completed", "test": {"wauc": 0.7}}, "lacks mean_auc"),
    ],
)
def test_a_value_that_is_not_a_record_says_why(values, reason):
    from moe_mlora.pipeline.schema import RecordError, RunRecord

    with pytest.raises(RecordError, match=reason):
        RunRecord.from_json(values)


def test_report_takes_key_value_arguments_like_every_command(tmp_path):
    folder = tmp_path / "data=toy,method=base,seed=1"  # a sweep job's name: stays a folder
    write_run(folder, "base", 1, 0.7, (0.7, 0.6))
    assert main([str(folder), f"out={tmp_path / 'kv'}", "wandb_project=x"]) == 0
    assert (tmp_path / "kv/report.csv").is_file()
    assert main([str(folder), "--out", str(tmp_path / "flags")]) == 0  # the older form
    assert (tmp_path / "kv/report.csv").read_bytes() == (tmp_path / "flags/report.csv").read_bytes()


@pytest.mark.slow
def test_a_runs_wandb_summary_holds_the_tested_models_validation(tmp_path, monkeypatch):
    """``selection/val_*`` in the W&B summary are results.json's ``validation``, not the last
    epoch's validation that the per-epoch series end with."""
    from lightning.pytorch.loggers import WandbLogger

    from moe_mlora.pipeline.loggers import log_to_wandb

    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    record = json.loads(
        (write_run(tmp_path, "base", 1, 0.7, (0.7, 0.6)) / "results.json").read_text()
    )
    record["validation"] = {"wauc": 0.71, "logloss": 0.44}
    logger = WandbLogger(save_dir=str(tmp_path), mode="offline", offline=True, project="test")
    logger._wandb_init.pop("anonymous", None)  # as build_loggers does
    try:
        log_to_wandb([logger], record, list(DOMAINS))
        summary = logger.experiment.summary
        assert summary["selection/val_wauc"] == 0.71 and summary["selection/val_logloss"] == 0.44
        assert summary["test/wauc"] == 0.7
    finally:
        logger.experiment.finish()
