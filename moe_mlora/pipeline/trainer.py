"""The Trainer of each phase: devices checked against the machine, the DDP strategy, the factory."""

from __future__ import annotations

import inspect
import logging
import os

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from moe_mlora.config import ConfigError
from moe_mlora.distributed import externally_launched
from moe_mlora.pipeline.loggers import extra_objects
from moe_mlora.sweep import (
    is_multirun,
)
from moe_mlora.training.callbacks import EpochLog, PhaseProgressBar
from moe_mlora.training.module import Phase

log = logging.getLogger("moe_mlora")


# Strategies that start fresh processes for every fit: the schedule keeps its state (best
# weights, early stopping, the module's metrics) in this process, so they cannot work.
SPAWNING_STRATEGIES = ("spawn", "fork", "notebook")


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def available_devices(accelerator: str) -> tuple[int, str] | None:
    """How many devices ``accelerator`` has here, and their kind; None when we cannot tell."""
    accelerator = accelerator.lower()
    if accelerator == "auto":
        if torch.cuda.is_available():
            accelerator = "gpu"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            accelerator = "mps"
        else:
            accelerator = "cpu"
    if accelerator in ("gpu", "cuda"):
        return torch.cuda.device_count(), "GPUs (torch.cuda.device_count())"
    if accelerator == "mps":
        available = getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
        return int(bool(available)), "MPS devices"
    if accelerator == "cpu":
        return usable_cpus(), "CPU cores (one process per device)"
    return None


def requested_devices(devices) -> int | None:
    """``trainer.devices`` as a count: an int, a numeric string or a list of ids; None = auto."""
    if OmegaConf.is_list(devices):
        devices = OmegaConf.to_container(devices)
    if isinstance(devices, (list, tuple)):
        return max(int(d) for d in devices) + 1 if devices else None
    if isinstance(devices, str):
        devices = devices.strip().rstrip(",")
        if "," in devices:
            return requested_devices([d for d in devices.split(",") if d.strip()])
        if not devices.lstrip("-").isdigit():
            return None  # "auto"
    count = int(devices)
    return count if count > 0 else None  # -1: all of them


def check_trainer(cfg: DictConfig) -> None:
    """Refuse trainer settings that would fail inside Lightning, before anything is built.

    ``trainer.devices`` above what this machine has would otherwise surface as a Lightning
    traceback after the data are loaded. CPU processes are counted against the usable
    cores, except when a cluster launcher (srun, torchrun) made the processes itself.
    """
    trainer = cfg.trainer
    strategy = str(trainer.get("strategy", "auto"))
    if any(word in strategy for word in SPAWNING_STRATEGIES):
        raise ConfigError(
            f"trainer.strategy={strategy} is not supported: it starts new processes for every "
            "fit, and the phases keep their state in this one; use trainer=ddp (strategy: ddp)"
        )
    asked = requested_devices(trainer.get("devices", "auto"))
    accelerator = str(trainer.get("accelerator", "auto"))
    found = available_devices(accelerator)
    if asked is not None and found is not None:
        available, kind = found
        external_cpu = kind.startswith("CPU") and externally_launched()
        if asked > available and not external_cpu:
            raise ConfigError(
                f"trainer.devices={trainer.devices} asks for {asked} devices but this machine "
                f"has {available} {kind} for trainer.accelerator={accelerator}; lower "
                f"trainer.devices to at most {available}"
            )
    processes = (asked or 1) * int(trainer.get("num_nodes", 1) or 1)
    if strategy.startswith("ddp") and processes > 1 and is_multirun() and not externally_launched():
        raise ConfigError(
            "trainer=ddp in a local sweep (-m) is not supported: Lightning would re-run the "
            "whole sweep command for each extra process. Run one job per command, or sweep "
            "with hydra/launcher=slurm hydra.launcher.tasks_per_node=<trainer.devices>"
        )


def trainer_strategy(strategy, unused_parameters: bool):
    """``ddp`` as a DDPStrategy fit for the phases; any other value as given.

    ``find_unused_parameters`` where a process's shard may hold no row of some expert or
    domain, whose adapter then gets no gradient there: phase 2's experts and MLoRA's domain
    adapters. Elsewhere every trainable parameter is used by every row (checked for all
    backbones), and the flag would cost a graph traversal per step. Buffer syncs before each
    forward are off: our buffers are constants (index tables, pretrained embeddings), the
    same on every rank from the start, and a sync would cost a collective per forward. The
    one exception, moving statistics (STAR's normalisation), is averaged over the processes
    before every evaluation instead (``average_running_statistics``).
    """
    if strategy != "ddp":
        return strategy
    ddp_options = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = (
        "forward_sync_buffers" if "forward_sync_buffers" in ddp_options else "broadcast_buffers"
    )
    return DDPStrategy(find_unused_parameters=unused_parameters, **{no_sync: False})


def trainer_factory(cfg: DictConfig, loggers: list[Logger]):
    options = OmegaConf.to_container(cfg.trainer, resolve=True)

    def make_trainer(phase: Phase, callbacks: list[L.Callback], reload: bool) -> L.Trainer:
        if "strategy" in options:  # a fresh strategy object per Trainer: they hold state
            unused = phase.per_expert or phase.spec.routing == "domain"
            options["strategy"] = trainer_strategy(cfg.trainer.strategy, unused)
        if options.get("enable_progress_bar", True):
            shown = PhaseProgressBar(phase.index, phase.kind)
        else:  # no bar (a pipe, nohup, SLURM): one log line per epoch instead
            shown = EpochLog(phase.index, phase.kind, phase.spec.monitor)
        extra = extra_objects(cfg.callbacks.get("extra"), "callbacks.extra", L.Callback)
        try:
            return L.Trainer(
                **options,
                logger=loggers,
                callbacks=[shown, *extra, *callbacks],
                enable_checkpointing=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                reload_dataloaders_every_n_epochs=1 if reload else 0,
            )
        except (TypeError, ValueError, MisconfigurationException) as error:
            raise ConfigError(f"trainer: Lightning refuses these settings: {error}") from error

    return make_trainer
