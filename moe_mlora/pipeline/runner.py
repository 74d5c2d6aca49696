"""One run from config to results: the folder's ownership, resume, training and test."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from moe_mlora.allocator import configure_allocator
from moe_mlora.checks import check_run_config
from moe_mlora.config import ConfigError
from moe_mlora.data.cache import usable_cache_dir
from moe_mlora.data.device import place_on_gpu
from moe_mlora.distributed import barrier, is_global_zero
from moe_mlora.pipeline.build import build_module, quiet_lightning, schedule_spec
from moe_mlora.pipeline.loggers import build_loggers, finish_wandb
from moe_mlora.pipeline.results import build_results, summary_table, to_log_files, write_results
from moe_mlora.pipeline.trainer import check_trainer, trainer_factory
from moe_mlora.reporting.domain_table import format_domain_table
from moe_mlora.runfolder import (
    finished_job,
    keep_hydra_record,
    owning,
    restore_hydra_record,
)
from moe_mlora.sweep import (
    config_fingerprint,
    job_threads,
)
from moe_mlora.threads import free_cpu_threads
from moe_mlora.training.checkpoints import CHECKPOINT_DIR, RunCheckpoints
from moe_mlora.training.phases import Schedule

# torch's own choice (one thread per core), before any run of this process changes it
TORCH_DEFAULT_THREADS = torch.get_num_threads()
log = logging.getLogger("moe_mlora")


def run_checkpoints(cfg: DictConfig, output_dir: Path) -> RunCheckpoints | None:
    """The run folder's checkpoints (None with ``checkpoint=false``); says when it resumes."""
    if not cfg.get("checkpoint", True):
        return None
    checkpoints = RunCheckpoints(output_dir, config_fingerprint(cfg))
    if checkpoints.exists():
        log.info("checkpoints in %s: continuing the interrupted run", checkpoints.folder)
        if is_global_zero():
            print(f"resuming from {checkpoints.folder}")
    return checkpoints


def check_resume(cfg: DictConfig) -> None:
    """``resume=DIR`` must name a run folder that has something to resume."""
    if cfg.get("resume") is None:
        return
    folder = Path(cfg.resume)
    if not folder.is_dir():
        raise ConfigError(f"resume={folder}: no such run folder")
    if not (folder / CHECKPOINT_DIR).is_dir() and not (folder / "results.json").is_file():
        raise ConfigError(
            f"resume={folder}: the folder has no {CHECKPOINT_DIR}/ to continue from (the run "
            "ended before its first epoch, or ran with checkpoint=false)"
        )


def run_single(cfg: DictConfig, output_dir: Path) -> dict:
    """One run (not a sweep job): a finished run in its folder is reported, not rerun.

    ``rerun=true`` trains a finished run of the same config again; a finished run of
    another config is never overwritten (FolderRefused).
    """
    check_resume(cfg)
    with owning(output_dir):
        finished = finished_job(output_dir, config_fingerprint(cfg))
        if finished is not None and not cfg.get("rerun", False):
            restore_hydra_record(output_dir)
            print(
                f"{output_dir} already completed: test WAUC {finished['test']['wauc']:.4f} "
                "(rerun=true trains it again)"
            )
            return finished
        return train_and_evaluate(cfg, output_dir)


def train_and_evaluate(cfg: DictConfig, output_dir: Path) -> dict:
    """Run the configured method's phases, test once, write ``results.json``; return the results.

    Under DDP every process runs this; only global rank 0 writes files and prints.
    """
    quiet_lightning()
    check_run_config(cfg)  # every value, and the data files there, before any work
    check_trainer(cfg)
    schedule_spec(cfg)  # a bad schedule fails before any data is read
    with owning(output_dir):
        keep_hydra_record(output_dir)
        return _train_and_evaluate(cfg, output_dir)


def set_threads(cfg: DictConfig) -> None:
    """``threads``, a sweep job's share, or (neither set) the CPUs other processes leave free.

    Under DDP, or with ``OMP_NUM_THREADS`` set, an unset ``threads`` leaves torch's choice.
    """
    threads = job_threads(cfg)
    ddp = str(cfg.trainer.get("strategy", "")).startswith("ddp")
    if threads:
        torch.set_num_threads(threads)
        if ddp:  # Lightning's DDP launcher sets cores // processes threads unless this is set
            os.environ["OMP_NUM_THREADS"] = str(threads)
        log.info("torch threads: %d", torch.get_num_threads())
        return
    if ddp or "OMP_NUM_THREADS" in os.environ:
        log.info("torch threads: %d", torch.get_num_threads())
        return
    threads, counted = free_cpu_threads(TORCH_DEFAULT_THREADS)
    torch.set_num_threads(threads)
    log.info("torch threads: %d (%s; set threads=N to choose)", threads, counted)
    if threads < TORCH_DEFAULT_THREADS:
        log.warning(
            "the machine is busy (%s): training on %d thread(s) instead of %d, which is faster "
            "when other processes hold the CPUs; set threads=N to choose",
            counted,
            threads,
            TORCH_DEFAULT_THREADS,
        )


def _train_and_evaluate(cfg: DictConfig, output_dir: Path) -> dict:
    start = time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    set_threads(cfg)
    try:
        configure_allocator(str(cfg.get("allocator", "tuned")))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    L.seed_everything(int(cfg.seed), verbose=False)
    datamodule = instantiate(
        cfg.data,
        shuffle_seed=int(cfg.seed),
        cache_dir=usable_cache_dir(cfg.paths.cache_dir),
        progress=cfg.progress,
    )
    datamodule.prepare()
    log.info("data\n%s", datamodule.describe())
    if cfg.data.get("on_device", True):
        place_on_gpu(datamodule.processed, str(cfg.trainer.accelerator), cfg.trainer.devices)
    module = build_module(cfg, datamodule)
    loggers = build_loggers(cfg, output_dir)
    try:
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        checkpoints = run_checkpoints(cfg, output_dir)
        schedule = Schedule(
            module,
            datamodule,
            trainer_factory(cfg, loggers),
            spec=schedule_spec(cfg),
            patience=cfg.callbacks.early_stopping.patience,
            min_delta=cfg.callbacks.early_stopping.min_delta,
            phase2_mode=cfg.method.get("phase2", "parallel"),
            checkpoints=checkpoints,
            seed=int(cfg.seed),
        )
        reports = schedule.run()
        test = schedule.test()
        results = build_results(
            cfg, module, datamodule, reports, test, time.perf_counter() - start, output_dir
        )
        if is_global_zero():
            write_results(loggers, output_dir, results, module, cfg, datamodule)
            if checkpoints is not None:
                checkpoints.clear()  # the run is complete: results.json and model.pt hold it
        barrier()  # no process ends before the run's files are written
    finally:
        finish_wandb(loggers)
    if is_global_zero():
        tables = [
            summary_table(results, reports),
            format_domain_table(test, datamodule.domain_names),
        ]
        for table in tables:
            print(table)
            to_log_files(table)
        print(f"results: {output_dir / 'results.json'}")
    return results
