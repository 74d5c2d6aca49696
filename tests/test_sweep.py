"""Sweeps: job folders, skipping finished jobs, recording failures, launchers and recipes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig
from test_run import tiny

from moe_mlora.config import CONF_DIR, ConfigError, compose, register_resolvers
from moe_mlora.pipeline.build import expert_count
from moe_mlora.pipeline.loggers import wandb_tags
from moe_mlora.pipeline.results import write_json_atomically
from moe_mlora.reporting.report import main as report_main
from moe_mlora.sweep import (
    MAX_DIRNAME,
    config_fingerprint,
    job_dirname,
    run_sweep_job,
    sweep_label,
    sweep_status,
)

EXPERIMENTS = sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml"))
SETTINGS_ONLY = ["reference_hparams"]  # recipes that set values for any run, and sweep nothing
SWEEPS = [name for name in EXPERIMENTS if name not in SETTINGS_ONLY]
LAUNCHERS = sorted(path.stem for path in (CONF_DIR / "hydra" / "launcher").glob("*.yaml"))


def compose_with_hydra(overrides: list[str]) -> DictConfig:
    """The config including its ``hydra`` node (launcher, sweeper params, sweep dir)."""
    register_resolvers()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides, return_hydra_config=True)


# ------------------------------------------------------------------- job folders
def test_job_dirname_is_one_readable_path_level():
    assert job_dirname("method=base,model=deepfm,seed=1") == "method=base,model=deepfm,seed=1"
    assert job_dirname("") == "default"
    assert "/" not in job_dirname("data.table.path=/data/logs/clicks.csv,seed=1")


def test_long_job_dirnames_are_bounded_and_stay_distinct():
    first = job_dirname("model.hidden_units=[" + "256," * 60 + "1]")
    second = job_dirname("model.hidden_units=[" + "256," * 60 + "2]")
    assert len(first) <= MAX_DIRNAME and len(second) <= MAX_DIRNAME
    assert first != second


def test_fingerprint_ignores_presentation_but_not_what_is_computed():
    base = config_fingerprint(compose(["seed=1"]))
    assert config_fingerprint(compose(["seed=1", "progress=false", "threads=1"])) == base
    assert config_fingerprint(compose(["seed=1", "logger.wandb.enabled=false"])) == base
    assert config_fingerprint(compose(["seed=2"])) != base
    assert config_fingerprint(compose(["seed=1", "data.users=201"])) != base


def test_dropout_mask_uniform_fingerprints_as_a_config_from_before_the_key() -> None:
    """Runs made before ``dropout_mask`` existed drew uniform masks; with
    ``dropout_mask=uniform`` they are the same job, with the new default they are not."""
    from omegaconf import open_dict

    uniform = compose(["seed=1", "dropout_mask=uniform"])
    before_the_key = compose(["seed=1"])
    with open_dict(before_the_key):
        del before_the_key["dropout_mask"]
    assert config_fingerprint(uniform) == config_fingerprint(before_the_key)
    assert config_fingerprint(compose(["seed=1"])) != config_fingerprint(before_the_key)


# ----------------------------------------------------------------- expert counts
@pytest.mark.parametrize(
    ("overrides", "domains", "expected"),
    [
        ([], 7, 7),
        (["experts=3"], 7, 3),
        (["experts_per_domain=2"], 7, 14),
        (["experts_per_domain=4"], 2, 8),
    ],
)
def test_expert_count_follows_experts_or_experts_per_domain(overrides, domains, expected):
    assert expert_count(compose(overrides), domains) == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["experts=4", "experts_per_domain=2"], "not both"),
        (["experts_per_domain=0"], "experts_per_domain must be >= 1"),
        (["experts=0"], "experts must be >= 1"),
    ],
)
def test_bad_expert_counts_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        expert_count(compose(overrides), 2)


# ------------------------------------------------------------ skip and failure
def completed_results(cfg: DictConfig) -> dict:
    return {
        "status": "completed",
        "run": {"config_fingerprint": config_fingerprint(cfg)},
        "test": {"wauc": 0.75, "mean_auc": 0.74, "auc": 0.76, "logloss": 0.45},
    }


def finish(folder, cfg: DictConfig) -> None:
    """A finished run's two artifacts: model.pt, then results.json (the commit marker)."""
    (folder / "model.pt").write_bytes(b"model")
    write_json_atomically(folder / "results.json", completed_results(cfg))


def test_a_finished_job_is_skipped_unless_rerun(tmp_path):
    cfg = compose(["seed=1"])
    finish(tmp_path, cfg)
    calls = []

    def train(cfg, output_dir):
        calls.append(output_dir)
        return {"test": {"wauc": 0.8}}

    assert run_sweep_job(cfg, tmp_path, train, write_json_atomically) == 0.75
    assert calls == []
    assert run_sweep_job(compose(["seed=1", "rerun=true"]), tmp_path, train, write_json_atomically)
    assert calls == [tmp_path]


def test_a_finished_run_of_another_config_is_refused_and_left_untouched(tmp_path, capsys):
    finish(tmp_path, compose(["seed=2"]))
    before = (tmp_path / "results.json").read_text()
    calls = []

    def train(cfg, output_dir):
        calls.append(output_dir)
        return {"test": {"wauc": 0.8}}

    for rerun in ("false", "true"):
        cfg = compose(["seed=1", f"rerun={rerun}"])
        assert run_sweep_job(cfg, tmp_path, train, write_json_atomically) is None
    assert calls == []
    assert (tmp_path / "results.json").read_text() == before
    assert "job refused" in capsys.readouterr().out


def test_results_without_their_model_are_not_a_finished_run(tmp_path):
    write_json_atomically(tmp_path / "results.json", completed_results(compose(["seed=1"])))
    trained = run_sweep_job(
        compose(["seed=1"]), tmp_path, lambda c, o: {"test": {"wauc": 0.8}}, write_json_atomically
    )
    assert trained == 0.8


def test_a_crashing_job_is_recorded_as_failed_and_does_not_raise(tmp_path):
    def train(cfg, output_dir):
        raise FloatingPointError("non-finite loss nan in phase2 (experts), epoch 3, step 17")

    assert run_sweep_job(compose(["seed=1"]), tmp_path, train, write_json_atomically) is None
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["status"] == "failed"
    assert record["error"]["type"] == "FloatingPointError"
    assert "epoch 3, step 17" in record["error"]["message"]
    assert record["run"]["method"] == "moe_mlora" and record["run"]["seed"] == 1
    assert "FloatingPointError" in (tmp_path / "error.txt").read_text()
    assert sweep_status(tmp_path) == {"failed": [tmp_path]}


def test_a_failed_job_runs_again_on_the_next_sweep(tmp_path):
    def crash(cfg, output_dir):
        raise RuntimeError("out of memory")

    cfg = compose(["seed=1"])
    run_sweep_job(cfg, tmp_path, crash, write_json_atomically)
    result = run_sweep_job(cfg, tmp_path, lambda c, o: {"test": {"wauc": 0.7}}, lambda p, r: None)
    assert result == 0.7


# ----------------------------------------------------- launchers and recipes
@pytest.mark.parametrize("experiment", SWEEPS)
def test_every_experiment_recipe_composes_with_a_sweep(experiment):
    # Users add data.root on the command line: the recipe's own data must have that key.
    root = [] if experiment == "demo" else ["data.root=/data/somewhere"]
    cfg = compose_with_hydra([f"experiment={experiment}", *root])
    params = cfg.hydra.sweeper.params
    assert params, f"{experiment} sweeps nothing"
    assert str(cfg.hydra.sweep.dir).startswith("multirun/")
    for key, values in params.items():
        for value in str(values).split(","):
            compose([f"experiment={experiment}", *root, f"{key}={value}"])  # each job composes


@pytest.mark.parametrize("experiment", SETTINGS_ONLY)
def test_settings_recipes_compose_with_any_sweep_recipe(experiment):
    cfg = compose_with_hydra(["experiment=[paper_taobao," + experiment + "]", "data.root=/d"])
    assert cfg.hydra.sweeper.params.model  # the sweep recipe's grid survives
    assert cfg.method.adapter.lora_reduce == 256  # the grid's first backbone is deepfm


def test_paper_grids_cover_eight_backbones_three_methods_three_seeds():
    for experiment, splits in [("paper_movielens", 3), ("paper_taobao", 3)]:
        params = compose_with_hydra([f"experiment={experiment}"]).hydra.sweeper.params
        assert len(params.data.split(",")) == splits
        assert len(params.model.split(",")) == 8 and "mlp" not in params.model
        assert params.method == "base,mlora,moe_mlora"
        assert params.seed == "1,2,3"


def test_experts_per_domain_recipe_takes_the_data_from_the_command_line():
    cfg = compose_with_hydra(["experiment=experts_per_domain", "data=taobao20"])
    assert cfg.data.name == "taobao20"
    assert cfg.method.name == "moe_mlora"
    assert cfg.hydra.sweeper.params.experts_per_domain == "1,2,4"
    assert cfg.hydra.sweep.dir == "multirun/experts_per_domain/taobao20"


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launcher_configs_compose(launcher):
    cfg = compose_with_hydra([f"hydra/launcher={launcher}"])
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")


def test_slurm_launcher_sets_resources_in_config():
    launcher = compose_with_hydra(["hydra/launcher=slurm"]).hydra.launcher
    assert "SlurmLauncher" in launcher._target_
    for key in ("cpus_per_task", "gpus_per_node", "timeout_min", "mem_gb", "partition"):
        assert key in launcher


# ------------------------------------------------------------- whole sweeps
def run_sweep(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "CI": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "moe_mlora.run", "-m", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def tiny_sweep(cache_dir: Path, sweep_dir: Path, *overrides: str) -> list[str]:
    """test_run's tiny runs, with W&B (offline) on and the sweep in ``sweep_dir``."""
    return tiny(cache_dir, "logger.wandb.enabled=true", f"hydra.sweep.dir={sweep_dir}", *overrides)


@pytest.mark.slow
def test_sweep_over_expert_counts_survives_a_failure_reports_and_resumes(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    # top_k=3 of 2 experts fails only once the model is built: a job failing mid-sweep
    top_k = "method.adapter.gate.top_k=3"
    args = tiny_sweep(tmp_path / "cache", sweep_dir, "experts=3,4,2", top_k, "seed=1")
    first = run_sweep(*args, cwd=tmp_path)

    assert "2 completed, 1 failed" in first.stdout
    by_status = sweep_status(sweep_dir)
    # folders are named by every override of the job, the swept ones included
    assert ["experts=3," in p.name for p in by_status["completed"]] == [True, False]
    assert ["experts=4," in p.name for p in by_status["completed"]] == [False, True]
    assert ["experts=2," in p.name for p in by_status["failed"]] == [True]
    for folder in by_status["completed"]:
        assert len(list((folder / "wandb").glob("offline-run-*"))) == 1
        run = json.loads((folder / "results.json").read_text())["run"]
        assert f"experts={run['experts']}" in run["overrides"]

    assert report_main([str(sweep_dir)]) == 0
    report_csv = (sweep_dir / "report" / "report.csv").read_text().strip().splitlines()
    assert len(report_csv) == 1 + 2  # header + one row per expert count
    assert "gate.top_k must be in 1..2" in (sweep_dir / "report" / "report.md").read_text()
    capsys.readouterr()

    finished = {p: (p / "results.json").stat().st_mtime_ns for p in by_status["completed"]}
    second = run_sweep(*args, cwd=tmp_path)
    assert second.stdout.count("skipped (finished earlier)") == 2
    assert all((p / "results.json").stat().st_mtime_ns == t for p, t in finished.items())
    assert "1 failed" in second.stdout  # the failed job ran again (and failed again)


def test_sweep_label_is_the_same_for_relative_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sweep_label("multirun/2026-11-24/10-00-00-ab12") == "2026-11-24/10-00-00-ab12"
    assert sweep_label(tmp_path / "multirun" / "paper_movielens") == "paper_movielens"
    assert sweep_label(tmp_path / "grids" / "ml100k") == "ml100k"


def test_wandb_tags_are_the_overrides_within_the_length_limit(monkeypatch):
    long_value = "data.root=/" + "x" * 100
    monkeypatch.setattr(
        "moe_mlora.pipeline.loggers.task_overrides", lambda: ["model=dcn", long_value]
    )
    tags = wandb_tags(compose(["logger.wandb.tags=[paper]"]))
    assert tags == ["paper", "model=dcn", long_value[:64]]


@pytest.mark.slow
def test_parallel_launcher_runs_jobs_in_processes_with_a_share_of_the_threads(tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = tiny_sweep(tmp_path / "cache", sweep_dir, "experts=2,3", "hydra/launcher=parallel")
    result = run_sweep(*args, cwd=tmp_path)
    assert "2 completed" in result.stdout
    share = max(1, (os.cpu_count() or 1) // 2)  # parallel.yaml: n_jobs 2
    for folder in sweep_status(sweep_dir)["completed"]:
        assert f"torch threads: {share}" in (folder / "run.log").read_text()
        assert len(list((folder / "wandb").glob("offline-run-*"))) == 1
