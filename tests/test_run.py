"""End-to-end runs through the Hydra config, and the errors users see on bad input."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_mlora.config import ConfigError, compose
from moe_mlora.data.processed import DataError
from moe_mlora.pipeline.runner import train_and_evaluate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny(cache_dir: Path, *overrides: str) -> list[str]:
    """Overrides for a run of a few seconds on a small generated dataset."""
    return [
        "data.users=200",
        "data.items=150",
        "data.ratings=6000",
        "model.hidden_units=[32,16]",
        "trainer.max_epochs=2",
        "logger.wandb.enabled=false",
        "progress=false",
        f"paths.cache_dir={cache_dir}",
        *overrides,
    ]


@pytest.mark.parametrize("method", ["base", "mlora", "moe_mlora"])
def test_each_method_runs_end_to_end(method, cache_dir, tmp_path):
    cfg = compose(tiny(cache_dir, f"method={method}"))
    results = train_and_evaluate(cfg, tmp_path)

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "completed"
    assert saved["run"]["method"] == method
    kinds = [phase["kind"] for phase in saved["phases"]]
    assert kinds == [phase["name"] for phase in saved["schedule"]["phases"]]
    assert saved["schedule"]["name"] == {"moe_mlora": "warm"}.get(method, method)
    test = saved["test"]
    assert 0.5 < test["wauc"] <= 1.0
    assert set(test["per_domain"]) == set(results["data"]["test"]["domains"])
    assert (
        sum(d["samples"] for d in test["per_domain"].values()) == saved["data"]["test"]["samples"]
    )
    params = saved["parameters"]
    assert params["total"] == params["backbone"] + params["adapter"] + params["gate"]
    assert (params["adapter"] > 0) == (method != "base")
    assert (tmp_path / "csv" / "metrics.csv").exists()
    if method == "moe_mlora":
        assert saved["run"]["experts"] == 7  # default: one per domain (age split)
        weights = test["gate_weights"]
        assert all(sum(row) == pytest.approx(1.0) for row in weights.values())


def test_experts_override_and_fewer_experts_than_domains(cache_dir, tmp_path):
    cfg = compose(tiny(cache_dir, "experts=3", "method/schedule=paper"))
    results = train_and_evaluate(cfg, tmp_path)
    experts = results["phases"][1]["experts"]
    assert [e["domains"] for e in experts] == [
        ["<18", "35-44", "56+"],
        ["18-24", "45-49"],
        ["25-34", "50-55"],
    ]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("experts=0", "experts=0 must be an integer >= 1"),
        ("method.adapter.lora_reduce=0", "lora_reduce"),
        ("method.adapter.lora_rank=0", "lora_rank"),
        ("allocator=jemalloc", "allocator must be one of"),
    ],
)
def test_bad_numbers_are_config_errors(override, message, cache_dir, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train_and_evaluate(compose(tiny(cache_dir, override)), tmp_path)
    assert not (tmp_path / "results.json").exists()


def test_missing_root_names_the_files_and_the_generator(cache_dir, tmp_path):
    cfg = compose(["data=movielens_gender", "logger.wandb.enabled=false", "progress=false"])
    with pytest.raises(DataError, match=r"data\.root") as error:
        train_and_evaluate(cfg, tmp_path)
    assert "u.data" in str(error.value) and "moe_mlora.data.generate" in str(error.value)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "CI": "1"}
    return subprocess.run(
        [sys.executable, "-m", "moe_mlora.run", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_run_writes_config_results_csv_and_offline_wandb(cache_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        *tiny(cache_dir, "logger.wandb.enabled=true", f"hydra.run.dir={out}"), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / ".hydra" / "config.yaml").exists()
    assert json.loads((out / "results.json").read_text())["status"] == "completed"
    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header.count("phase2/val/wauc") == 1  # the default schedule's (warm) last phase
    assert "phase1/val/wauc" in header and "phase3/val/wauc" not in header
    offline_runs = list((out / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert "wandb sync" in result.stdout + result.stderr
    assert "test: WAUC" in result.stdout


@pytest.mark.slow
def test_cli_bad_inputs_exit_with_a_clear_message(tmp_path):
    unknown = run_cli("model=nosuchmodel", cwd=tmp_path)
    assert unknown.returncode != 0
    assert "deepfm" in unknown.stderr and "mlp" in unknown.stderr  # Hydra lists the options

    missing = run_cli("data=movielens_gender", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert missing.returncode == 2
    assert "data.root is not set" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert not (tmp_path / "r").exists()  # refused before Hydra made the run folder


def test_binned_auc_mode_reports_an_error_bound_close_to_the_exact_value(cache_dir, tmp_path):
    exact = train_and_evaluate(compose(tiny(cache_dir, "method=base")), tmp_path / "exact")
    binned = train_and_evaluate(
        compose(tiny(cache_dir, "method=base", "evaluation.auc_bins=65536")), tmp_path / "binned"
    )
    bound = binned["test"]["wauc_error_bound"]
    assert 0 <= bound < 0.01  # a tiny test set, so a coarse bound
    assert abs(binned["test"]["wauc"] - exact["test"]["wauc"]) <= bound + 1e-12
    assert "wauc_error_bound" not in exact["test"]


def test_bad_auc_bins_is_a_config_error(cache_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"evaluation\.auc_bins"):
        train_and_evaluate(compose(tiny(cache_dir, "evaluation.auc_bins=1")), tmp_path)


def test_bad_dropout_mask_is_a_config_error(cache_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"dropout_mask='fast'.*bits, uniform"):
        train_and_evaluate(compose(tiny(cache_dir, "dropout_mask=fast")), tmp_path)


def test_gpu_trainer_composes_and_without_cuda_the_data_stay_on_the_cpu(ml100k_root):
    from moe_mlora.data.device import place_on_gpu, split_bytes
    from moe_mlora.data.movielens import prepare_movielens

    cfg = compose(["trainer=gpu", "trainer.precision=bf16-mixed"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    data = prepare_movielens(ml100k_root, "gender")
    assert split_bytes(data) > 0
    if not torch.cuda.is_available():
        assert not place_on_gpu(data, "gpu", 1)
    assert not place_on_gpu(data, "cpu", 1)
    assert not place_on_gpu(data, "gpu", 2)  # DDP: each rank copies its own batches
    assert data.splits["train"].sparse.device.type == "cpu"


def test_extra_loggers_and_callbacks_come_from_yaml(cache_dir, tmp_path):
    extras = [
        "+logger.extra.second._target_=lightning.pytorch.loggers.CSVLogger",
        "+logger.extra.second.name=second_csv",
        "+callbacks.extra.lr._target_=lightning.pytorch.callbacks.LearningRateMonitor",
    ]
    train_and_evaluate(compose(tiny(cache_dir, "method=base", *extras)), tmp_path)
    (metrics,) = (tmp_path / "second_csv").rglob("metrics.csv")  # written into the run folder
    header = metrics.read_text().splitlines()[0]
    assert "phase1/train/loss" in header and "lr-Adam" in header


def test_an_extra_logger_that_is_not_one_is_a_config_error(cache_dir, tmp_path):
    bad = "+logger.extra.x._target_=collections.OrderedDict"
    with pytest.raises(ConfigError, match=r"logger\.extra\.x: collections\.OrderedDict is not"):
        train_and_evaluate(compose(tiny(cache_dir, "method=base", bad)), tmp_path)


def readme_run_commands() -> list[list[str]]:
    """Every ``python -m moe_mlora.run ...`` line of the README (continuations joined)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    text = text.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        if line.startswith("python -m moe_mlora.run "):
            words = shlex.split(line.split(" #", 1)[0], comments=False)[3:]
            commands.append(words)
    return commands


def test_the_readme_run_commands_compose():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from moe_mlora.config import CONF_DIR, register_resolvers
    from moe_mlora.precheck import split_sweeps

    commands = readme_run_commands()
    assert len(commands) >= 25
    register_resolvers()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for words in commands:
            tokens = [w for w in words if not w.startswith("-")]
            fixed, swept = split_sweeps(tokens)
            first = [*fixed, *(f"{key}={values[0]}" for key, values in swept.items())]
            hydra_compose("config", overrides=first, return_hydra_config=True)


def test_a_key_of_a_swept_group_is_passed_so_that_hydras_sweep_config_accepts_it():
    from moe_mlora.precheck import sweep_safe_argv

    argv = ["-m", "data=movielens_gender,movielens_age", "data.root=/x", "model=deepfm,dcn"]
    argv += ["model.embedding_dim=4", "seed=1,2"]
    # synthetic (the default data) has no root; every model config has embedding_dim
    assert sweep_safe_argv(argv) == [*argv[:2], "++data.root=/x", *argv[3:]]
    single = ["data=movielens_gender", "data.root=/x"]
    assert sweep_safe_argv(single) == single  # no sweep: Hydra composes the job itself
    recipe = ["-m", "experiment=baselines_movielens", "data.root=/x"]
    assert sweep_safe_argv(recipe) == recipe  # the recipe's data has the key
