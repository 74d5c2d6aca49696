"""Checkpoints, resume after a crash or a SIGKILL, determinism, and NaN losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_run import tiny

import moe_mlora.training.module as module_code
from moe_mlora.config import ConfigError, compose
from moe_mlora.pipeline.runner import check_resume, train_and_evaluate
from moe_mlora.training.checkpoints import (
    CheckpointError,
    RunCheckpoints,
    load_checkpoint_file,
    save_atomically,
)
from moe_mlora.training.module import CTRModule
from moe_mlora.training.phases import Schedule

# Enough rows and epochs that phase 2 lasts several epochs (a window to kill it in).
RESUMABLE = [
    "data.ratings=12000",
    "trainer.max_epochs=6",
    "model.hidden_units=[64,32]",
    "method/schedule=paper",  # the checks below name the paper's phase 2 (experts)
]


def outcome(results: dict) -> dict:
    """What must not change between two runs of one config: metrics, epochs, best epochs."""
    phases = [
        {key: phase[key] for key in ("kind", "epochs", "best_epoch", "best_val_wauc", "experts")}
        for phase in results["phases"]
    ]
    return {"test": results["test"], "phases": phases}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def uninterrupted(cache_dir, tmp_path_factory) -> dict:
    """The reference: the resumable config run once without interruption."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    return train_and_evaluate(compose(tiny(cache_dir, *RESUMABLE)), folder)


def test_same_seed_same_machine_gives_bit_identical_metrics(cache_dir, uninterrupted, tmp_path):
    again = train_and_evaluate(compose(tiny(cache_dir, *RESUMABLE)), tmp_path)
    assert outcome(again) == outcome(uninterrupted)


def test_a_completed_run_leaves_no_checkpoints(uninterrupted):
    folder = Path(uninterrupted["run"]["output_dir"])
    assert (folder / "results.json").is_file()
    assert not (folder / "checkpoints").exists()


def test_crash_after_phase_two_resumes_at_phase_three_with_the_same_result(
    cache_dir, uninterrupted, tmp_path, monkeypatch
):
    cfg = compose(tiny(cache_dir, *RESUMABLE))
    ran = []

    real_phase = Schedule.run_phase

    def crash(self, index, spec):
        if index == 3:
            raise RuntimeError("simulated crash at the start of phase 3")
        return real_phase(self, index, spec)

    monkeypatch.setattr(Schedule, "run_phase", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_and_evaluate(cfg, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "phase1.pt",
        "phase2.pt",
    ]
    monkeypatch.undo()

    def record(self, index, spec):  # phases 1 and 2 must be skipped on resume
        ran.append(index)
        return real_phase(self, index, spec)

    monkeypatch.setattr(Schedule, "run_phase", record)
    resumed = train_and_evaluate(cfg, tmp_path)
    assert ran == [3]
    assert outcome(resumed) == outcome(uninterrupted)


def test_nan_loss_names_phase_epoch_and_step_and_keeps_the_last_good_checkpoint(
    cache_dir, tmp_path, monkeypatch
):
    real_loss, poisoned = module_code.expert_mean_bce, {"now": False}

    def poison_phase2_epoch2(self):
        poisoned["now"] = self.phase.kind == "experts" and self.current_epoch == 2

    def loss_turning_nan(logits, label, expert):
        loss = real_loss(logits, label, expert)
        return loss * torch.nan if poisoned["now"] else loss

    monkeypatch.setattr(CTRModule, "on_train_epoch_start", poison_phase2_epoch2, raising=False)
    monkeypatch.setattr(module_code, "expert_mean_bce", loss_turning_nan)
    with pytest.raises(FloatingPointError, match=r"phase2 \(experts\), epoch 2, step \d+"):
        train_and_evaluate(compose(tiny(cache_dir, *RESUMABLE)), tmp_path)
    kept = tmp_path / "checkpoints" / "phase2-last.ckpt"
    assert load_checkpoint_file(kept)["epoch"] == 1  # saved after epochs 0 and 1, the good ones
    assert not (tmp_path / "results.json").exists()


def test_resume_with_another_config_is_refused(cache_dir, tmp_path, monkeypatch):
    real_phase = Schedule.run_phase
    monkeypatch.setattr(
        Schedule, "run_phase", lambda self, i, spec: 1 / 0 if i == 3 else real_phase(self, i, spec)
    )
    with pytest.raises(ZeroDivisionError):
        train_and_evaluate(compose(tiny(cache_dir, *RESUMABLE)), tmp_path)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="another config"):
        train_and_evaluate(compose(tiny(cache_dir, *RESUMABLE, "seed=7")), tmp_path)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    checkpoints = RunCheckpoints(tmp_path, "abc")
    checkpoints.folder.mkdir()
    checkpoints.phase_file(1).write_bytes(b"\x00 not a checkpoint")
    with pytest.raises(CheckpointError, match=r"phase1\.pt is not a readable checkpoint"):
        checkpoints.finished_phase(1)


def test_atomic_save_leaves_only_the_final_file(tmp_path):
    save_atomically({"x": torch.ones(3)}, tmp_path / "a.pt")
    save_atomically({"x": torch.zeros(3)}, tmp_path / "a.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]
    assert torch.equal(load_checkpoint_file(tmp_path / "a.pt")["x"], torch.zeros(3))


def test_resume_needs_a_run_folder_with_checkpoints(tmp_path):
    with pytest.raises(ConfigError, match="no such run folder"):
        check_resume(compose([f"resume={tmp_path / 'missing'}"]))
    with pytest.raises(ConfigError, match="checkpoint=false"):
        check_resume(compose([f"resume={tmp_path}"]))


@pytest.mark.slow
def test_sigkill_during_phase_two_then_resume_gives_the_same_results(
    cache_dir, uninterrupted, tmp_path
):
    folder = tmp_path / "run"
    args = [*tiny(cache_dir, *RESUMABLE)]
    env = {**os.environ, "WANDB_MODE": "offline", "CI": "1"}
    command = [sys.executable, "-m", "moe_mlora.run", *args]
    process = subprocess.Popen(
        [*command, f"hydra.run.dir={folder}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    epoch_checkpoint = folder / "checkpoints" / "phase2-last.ckpt"
    deadline = time.monotonic() + 300
    while not epoch_checkpoint.exists():
        assert process.poll() is None, "the run ended before phase 2 wrote a checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (folder / "results.json").exists()

    resumed = subprocess.run(
        [*command, f"resume={folder}"], env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    results = json.loads((folder / "results.json").read_text())
    assert outcome(results) == outcome(uninterrupted)


class Crash(Exception):
    """Stands for a crash in the middle of a phase."""


@pytest.mark.parametrize("method", ["mlora", "shared_bottom", "mmoe", "ple", "star", "pepnet"])
def test_every_single_phase_method_resumes_mid_phase_with_the_same_result(
    cache_dir, tmp_path, monkeypatch, method
):
    """Interrupted at the start of its fourth epoch, then resumed from the epoch checkpoint:
    the per-domain parts, STAR's moving statistics and Adam's state all come back."""
    overrides = tiny(cache_dir, f"method={method}", "data.ratings=12000", "trainer.max_epochs=5")
    reference = train_and_evaluate(compose(overrides), tmp_path / "reference")
    assert reference["phases"][0]["epochs"] == 5  # no early stop before the crash point

    real = CTRModule.on_train_epoch_start

    def crash_at_epoch_three(self):
        if self.current_epoch == 3:
            raise Crash
        return real(self)

    monkeypatch.setattr(CTRModule, "on_train_epoch_start", crash_at_epoch_three)
    with pytest.raises(Crash):
        train_and_evaluate(compose(overrides), tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "phase1-last.ckpt").is_file()
    monkeypatch.undo()
    resumed = train_and_evaluate(compose(overrides), tmp_path / "run")
    assert outcome(resumed) == outcome(reference)
