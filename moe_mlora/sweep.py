"""Sweeps that lose nothing: stable job folders, skip finished jobs, record failures, go on.

A Hydra multirun job (``python -m moe_mlora.run -m ...``) runs through :func:`run_sweep_job`:

* its folder is named by its overrides (``data=movielens_gender,method=base,seed=1``), so
  rerunning the same sweep into the same ``hydra.sweep.dir`` finds each job's earlier folder;
* a job whose folder already holds a completed ``results.json`` from the same config is skipped
  (``rerun=true`` runs it again); one that was interrupted continues from its checkpoints;
* a job that raises (bad config value, missing data, NaN loss, any crash) writes a ``failed``
  ``results.json`` and ``error.txt`` with the error and traceback, and the sweep goes on;
* at the end, :class:`SweepSummary` prints how many jobs completed and failed, and the
  ``python -m moe_mlora.report`` command for the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from moe_mlora.distributed import is_global_zero
from moe_mlora.pipeline.schema import RunInfo, RunRecord
from moe_mlora.runfolder import FolderRefused, finished_job, owning, restore_hydra_record
from moe_mlora.training.checkpoints import CHECKPOINT_DIR

log = logging.getLogger("moe_mlora")

# Keys that change how a run is shown or where it caches, not what it computes: a finished job
# run with other values of these is still the same job.
PRESENTATION_KEYS = (
    "progress",
    "threads",
    "allocator",
    "rerun",
    "resume",
    "checkpoint",
    "logger",
    "paths",
)
MAX_DIRNAME = 120


def job_dirname(override_dirname: str) -> str:
    """A job folder name from Hydra's ``override_dirname``: readable, one path level, bounded.

    Path separators and unusual characters become ``_``; names longer than MAX_DIRNAME keep
    their start and gain a hash of the whole, so two long names never collide.
    """
    name = re.sub(r"[^A-Za-z0-9._=,+\-\[\]]", "_", override_dirname) or "default"
    if len(name) > MAX_DIRNAME:
        digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:10]
        name = f"{name[: MAX_DIRNAME - 11]}-{digest}"
    return name


def config_fingerprint(cfg: DictConfig) -> str:
    """A hash of the resolved config without PRESENTATION_KEYS: equal means the same job."""
    values = OmegaConf.to_container(cfg, resolve=True)
    for key in PRESENTATION_KEYS:
        values.pop(key, None)
    if values.get("dropout_mask") == "uniform":
        # Configs written before the key existed drew uniform masks: with it spelled out,
        # their runs still count as the same job (skipped when finished, resumed when not).
        values.pop("dropout_mask")
    for presentation in ("enable_progress_bar",):
        values.get("trainer", {}).pop(presentation, None)
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def task_overrides() -> list[str]:
    """The job's command-line and sweep overrides (``model=deepfm``...), [] outside Hydra."""
    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def sweep_label(sweep_dir: Path | str) -> str:
    """A sweep's name for W&B groups: its path below ``multirun/`` (else its folder name).

    The same for the jobs (which see ``hydra.sweep.dir`` as given) and the report (which sees
    the folder as the user types it), whether either path is relative or absolute.
    """
    parts = Path(sweep_dir).resolve().parts
    if "multirun" in parts[:-1]:
        below = parts[len(parts) - parts[::-1].index("multirun") :]
        return "/".join(below)
    return parts[-1] if parts else str(sweep_dir)


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"


def read_results(path: Path) -> dict | None:
    """A results.json's content, or None when it is absent or unreadable (a killed writer)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_name(cfg: DictConfig) -> str:
    """``data-model-method-sSEED``; the method reads ``moe_mlora.warm`` for a schedule other
    than the method's own one-phase one, so W&B names tell schedules apart."""
    schedule = (cfg.method.get("schedule") or {}).get("name")
    method = (
        cfg.method.name if schedule in (None, cfg.method.name) else f"{cfg.method.name}.{schedule}"
    )
    return f"{cfg.data.name}-{cfg.model.name}-{method}-s{cfg.seed}"


def run_fields(cfg: DictConfig) -> dict[str, Any]:
    """What identifies a run in results.json and the report, read from its config alone."""
    return {
        "name": run_name(cfg),
        "data": cfg.data.name,
        "model": cfg.model.name,
        "method": cfg.method.name,
        "schedule": (cfg.method.get("schedule") or {}).get("name"),
        "experts": cfg.experts,
        "experts_per_domain": cfg.get("experts_per_domain"),
        "seed": int(cfg.seed),
        "overrides": task_overrides(),
        "config_fingerprint": config_fingerprint(cfg),
        "debug": cfg.get("debug_mode"),
    }


def failure_record(cfg: DictConfig, output_dir: Path, error: BaseException, seconds: float):
    """The ``failed`` results.json of a job: which run, what went wrong, and where."""
    record = RunRecord(
        status="failed",
        run=RunInfo(**run_fields(cfg), output_dir=str(output_dir)),
        error={
            "type": type(error).__name__,
            "message": str(error),
            "traceback": "".join(traceback.format_exception(error)),
        },
        wall_time_s=seconds,
    )
    return record.to_json()


def run_sweep_job(
    cfg: DictConfig,
    output_dir: Path,
    train: Callable[[DictConfig, Path], dict],
    write_json: Callable[[Path, dict], None],
) -> float | None:
    """One multirun job: skip it if finished, else train; a failure is recorded, not raised.

    A folder held by another process, or holding another config's finished run, is left
    untouched: the job is refused with one line and the sweep goes on.
    """
    try:
        with owning(output_dir):
            previous = finished_job(output_dir, config_fingerprint(cfg))
            if previous is not None and not cfg.get("rerun", False):
                restore_hydra_record(output_dir)
                log.info(
                    "skipping %s: results.json is complete (rerun=true runs it again)", output_dir
                )
                print(f"skipped (finished earlier): {output_dir}")
                return previous["test"]["wauc"]
            return _train_job(cfg, output_dir, train, write_json)
    except FolderRefused as error:
        log.error("job refused: %s", error)
        print(f"moe_mlora: job refused: {error}")
        return None


def _train_job(cfg, output_dir: Path, train, write_json) -> float | None:
    if cfg.get("rerun", False):
        shutil.rmtree(output_dir / CHECKPOINT_DIR, ignore_errors=True)  # start afresh
    start = time.perf_counter()
    try:
        return train(cfg, output_dir)["test"]["wauc"]
    except Exception as error:
        record = failure_record(cfg, output_dir, error, time.perf_counter() - start)
        if is_global_zero():  # under DDP (a multi-task SLURM job) one writer
            try:
                output_dir.mkdir(parents=True, exist_ok=True)
                (output_dir / "error.txt").write_text(record["error"]["traceback"])
                write_json(output_dir / "results.json", record)
            except OSError as write_error:  # a full disk: say so, the sweep still goes on
                log.error("could not record the failure in %s: %s", output_dir, write_error)
        log.error("job failed (%s: %s); the sweep goes on", type(error).__name__, error)
        print(f"moe_mlora: job failed: {type(error).__name__}: {error} ({output_dir})")
        return None


def job_threads(cfg: DictConfig) -> int | None:
    """Torch threads for this job: ``threads`` if set, else a fair share under a launcher.

    Parallel local jobs (joblib) each get cpu_count // n_jobs threads, so N jobs do not each
    start a full-size thread pool and oversubscribe the cores; a SLURM job gets the CPUs it
    asked for (torch would otherwise count the whole node's cores).
    """
    if cfg.get("threads"):
        return int(cfg.threads)
    if not HydraConfig.initialized():
        return None
    launcher = HydraConfig.get().launcher
    target = str(launcher.get("_target_", ""))
    if "JoblibLauncher" in target:
        cores = os.cpu_count() or 1
        jobs = int(launcher.get("n_jobs") or 1)
        jobs = cores if jobs <= 0 else jobs
        return max(1, cores // jobs)
    if "submitit" in target and launcher.get("cpus_per_task"):
        return int(launcher.cpus_per_task)
    return None


def sweep_status(sweep_dir: Path) -> dict[str, list[Path]]:
    """The run folders under a sweep folder, by the status their results.json records."""
    by_status: dict[str, list[Path]] = {}
    for path in sorted(sweep_dir.rglob("results.json")):
        status = (read_results(path) or {}).get("status", "unreadable")
        by_status.setdefault(status, []).append(path.parent)
    return by_status


class SweepSummary(Callback):
    """Hydra callback: after a multirun, say what completed and failed, and how to report it."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        by_status = sweep_status(sweep_dir)
        counts = ", ".join(f"{len(dirs)} {status}" for status, dirs in sorted(by_status.items()))
        print(f"\nsweep {sweep_dir}: {counts or 'no results'}")
        for folder in by_status.get("failed", []):
            error = (read_results(folder / "results.json") or {}).get("error", {})
            first_line = str(error.get("message", "")).splitlines()[:1]
            print(f"  failed: {folder}: {error.get('type')}: {' '.join(first_line)}")
        if by_status.get("failed"):
            print("  fix the cause and run the same command again: finished jobs are skipped")
        print(f"report: python -m moe_mlora.report {sweep_dir}")
