"""Train and test one (data, model, method) combination: ``python -m moe_mlora.run [overrides]``.

Examples::

    python -m moe_mlora.run                                   # generated MovieLens-format data
    python -m moe_mlora.run data=movielens_gender data.root=/data/ml-1m method=moe_mlora experts=4
    python -m moe_mlora.run -m method=base,mlora,moe_mlora    # a sweep, one folder per job
    python -m moe_mlora.run --help                            # config groups and keys

Each run writes into its own folder: ``.hydra/config.yaml`` (the resolved
config), ``results.json``, ``csv/metrics.csv`` and a W&B run (offline unless
``logger.wandb.mode=online``).
"""

from __future__ import annotations

import errno
import inspect
import json
import logging
import math
import os
import shlex
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from moe_mlora.allocator import configure_allocator
from moe_mlora.checks import check_memory, check_run_config
from moe_mlora.config import CONF_DIR, ConfigError, check_conf_dir, register_resolvers
from moe_mlora.data.cache import usable_cache_dir
from moe_mlora.data.device import place_on_gpu
from moe_mlora.data.processed import DataError
from moe_mlora.distributed import barrier, externally_launched, is_global_zero
from moe_mlora.metrics import format_domain_table
from moe_mlora.models import AdapterConfig, build_model
from moe_mlora.models.complexity import complexity
from moe_mlora.runfolder import (
    FolderRefused,
    StorageError,
    finished_job,
    keep_hydra_record,
    owning,
    restore_hydra_record,
)
from moe_mlora.serving import save_model
from moe_mlora.sweep import (
    config_fingerprint,
    is_multirun,
    job_threads,
    run_fields,
    run_name,
    run_sweep_job,
    sweep_label,
    task_overrides,
)
from moe_mlora.training.callbacks import EpochLog, PhaseProgressBar
from moe_mlora.training.checkpoints import CHECKPOINT_DIR, CheckpointError, RunCheckpoints
from moe_mlora.training.module import CTRModule, Phase
from moe_mlora.training.phases import PhaseReport, Schedule, metrics_to_json
from moe_mlora.training.schedules import ScheduleError, ScheduleSpec

log = logging.getLogger("moe_mlora")


# ------------------------------------------------------------------- building
def quiet_lightning() -> None:
    """Lightning's per-Trainer banners (GPU available..., LOCAL_RANK...) x 4 phases are noise."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
    # Under DDP: validation and test values come from metrics synced across the processes
    # (DomainAUC, the gathered per-expert rows), identical on every rank: no sync_dist needed.
    warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed.*")


# Keys of method.adapter that moved into its gate block: old name -> new name.
RENAMED_ADAPTER_KEYS = {"gate_input": "gate.input", "gate_embedding_dim": "gate.embedding_dim"}


def schedule_spec(cfg: DictConfig) -> ScheduleSpec:
    """``method.schedule`` (a ``conf/method/schedule/`` file, or a block) as a checked spec."""
    if cfg.method.get("schedule") is None:
        raise ConfigError(
            f"method={cfg.method.name} has no schedule; add `defaults: [schedule: ...]` to its "
            "YAML or pick one with method/schedule=<name>"
        )
    try:
        spec = ScheduleSpec.from_mapping(OmegaConf.to_container(cfg.method.schedule, resolve=True))
        spec.check_adapter(str(cfg.method.adapter.kind), str(cfg.method.name))
    except (ScheduleError, TypeError) as error:
        raise ConfigError(f"method.schedule: {error}") from error
    return spec


def adapter_config(cfg: DictConfig, num_domains: int) -> AdapterConfig:
    """``method.adapter`` (with its ``gate`` block) and ``experts`` as an AdapterConfig.

    Bad values become ConfigErrors naming the key (``method.adapter.gate.top_k``...). A
    schedule that starts the gate at the own-expert routing gets an anchored gate.
    """
    spec = OmegaConf.to_container(cfg.method.adapter, resolve=True)
    for old, new in RENAMED_ADAPTER_KEYS.items():
        if old in spec:
            raise ConfigError(f"method.adapter.{old} is now method.adapter.{new}; rename it")
    if spec.get("kind") == "moe":
        spec["experts"] = expert_count(cfg, num_domains)
        if any("gate_own_experts" in phase.init for phase in schedule_spec(cfg).phases):
            spec.setdefault("gate", {})["anchored"] = True
    else:
        for key in ("experts", "experts_per_domain"):
            if cfg.get(key) is not None:
                log.warning(
                    "%s=%s is ignored: method=%s has no experts", key, cfg[key], cfg.method.name
                )
        if spec.get("gate"):
            log.warning("method.adapter.gate is ignored: method=%s has no gate", cfg.method.name)
    try:
        return AdapterConfig(**spec)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"method.adapter: {error}") from error


def expert_count(cfg: DictConfig, num_domains: int) -> int:
    """MoE-MLoRA's total experts: ``experts``, or ``experts_per_domain`` x domains, or one each."""
    total, per_domain = cfg.experts, cfg.get("experts_per_domain")
    if total is not None and per_domain is not None:
        raise ConfigError(
            f"set experts ({total}) or experts_per_domain ({per_domain}), not both: "
            "experts is the total, experts_per_domain multiplies the number of domains"
        )
    if per_domain is not None:
        if int(per_domain) < 1:
            raise ConfigError(f"experts_per_domain must be >= 1, got {per_domain}")
        return int(per_domain) * num_domains
    if total is not None and int(total) < 1:
        raise ConfigError(f"experts must be >= 1, got {total} (or null: one per domain)")
    return int(total) if total is not None else num_domains


def build_module(cfg: DictConfig, datamodule) -> CTRModule:
    data = datamodule.processed
    adapter = adapter_config(cfg, data.num_domains)
    model_options = {k: v for k, v in cfg.model.items() if k != "name"}
    model_options = OmegaConf.to_container(OmegaConf.create(model_options), resolve=True)

    tower = cfg.method.get("tower")
    tower = OmegaConf.to_container(tower, resolve=True) if tower is not None else None

    def build(adapter: AdapterConfig):
        try:
            return build_model(
                cfg.model.name, data.fields, data.num_domains, adapter, tower=tower,
                **model_options,
            )  # fmt: skip
        except (ValueError, TypeError) as error:  # a model option out of range: name it
            raise ConfigError(f"model={cfg.model.name}: {error} (set in model.*)") from error

    if adapter.kind == "moe":
        check_expert_memory(cfg, adapter, build)
    bins = cfg.get("evaluation", {}).get("auc_bins")
    return CTRModule(
        build(adapter),
        data.domain_names,
        cfg.optimizer.lr,
        cfg.optimizer.weight_decay,
        auc_bins=bins,
    )


def check_expert_memory(cfg: DictConfig, adapter: AdapterConfig, build) -> None:
    """Refuse an expert count that would not fit, from two small models (k and k+1 experts).

    Parameters grow linearly with the experts, so the two models give the full model's
    count without allocating it; the tower's widths give the activations per expert.
    """
    fewest = max(1, adapter.gate.top_k or 1)  # top_k needs that many experts
    if adapter.experts <= fewest + 1:
        return
    with torch.random.fork_rng(devices=[]):  # the probes must not move the seeded init
        one, two = (build(replace(adapter, experts=count)) for count in (fewest, fewest + 1))
    per_expert = two.parameter_counts()["total"] - one.parameter_counts()["total"]
    parameters = one.parameter_counts()["total"] + per_expert * (adapter.experts - fewest)
    widths = [layer.out_features for layer in one.modules() if isinstance(layer, torch.nn.Linear)]
    check_memory(cfg, parameters, adapter.experts, widths)


WANDB_GROUP_LIMIT = 128  # characters W&B accepts in a group name


def sweep_group(cfg: DictConfig) -> str | None:
    """``logger.wandb.group``, else the sweep's folder (multirun/DATE/TIME-ID) in a multirun."""
    if cfg.logger.wandb.group:
        return str(cfg.logger.wandb.group)
    if is_multirun():
        return sweep_label(HydraConfig.get().sweep.dir)[-WANDB_GROUP_LIMIT:]
    return None


def csv_version(output_dir: Path) -> str:
    """``csv/`` for a run's metrics; a resumed run writes ``csv/attempt2/``... beside them."""
    csv_dir = output_dir / "csv"
    if not (csv_dir / "metrics.csv").exists():
        return ""
    attempt = 2
    while (csv_dir / f"attempt{attempt}").exists():
        attempt += 1
    return f"attempt{attempt}"


def build_loggers(cfg: DictConfig, output_dir: Path) -> list[Logger]:
    loggers: list[Logger] = [
        CSVLogger(str(output_dir), name="csv", version=csv_version(output_dir))
    ]
    settings = cfg.logger.wandb
    if settings.enabled and settings.mode != "disabled":
        os.environ.setdefault("WANDB_SILENT", "true")
        wandb_logger = WandbLogger(
            project=settings.project,
            entity=settings.entity,
            group=sweep_group(cfg),
            job_type=cfg.method.name,
            name=run_name(cfg),
            tags=wandb_tags(cfg),
            save_dir=str(output_dir),
            mode=settings.mode,
            offline=settings.mode == "offline",
        )
        # Lightning always passes `anonymous`, which recent wandb deprecates with a warning.
        wandb_logger._wandb_init.pop("anonymous", None)
        loggers.append(wandb_logger)
    return loggers


WANDB_TAG_LIMIT = 64  # characters W&B accepts per tag


def wandb_tags(cfg: DictConfig) -> list[str]:
    """``logger.wandb.tags`` plus the job's overrides (``model=deepfm``), to filter runs by."""
    tags = [*cfg.logger.wandb.tags, *task_overrides()]
    return list(dict.fromkeys(tag[:WANDB_TAG_LIMIT] for tag in tags))


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
    same on every rank from the start, and a sync would cost a collective per forward.
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
        try:
            return L.Trainer(
                **options,
                logger=loggers,
                callbacks=[shown, *callbacks],
                enable_checkpointing=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                reload_dataloaders_every_n_epochs=1 if reload else 0,
            )
        except (TypeError, ValueError, MisconfigurationException) as error:
            raise ConfigError(f"trainer: Lightning refuses these settings: {error}") from error

    return make_trainer


# -------------------------------------------------------------------- results
FLOP_BATCH = 1024  # test rows the FLOPs are counted on (a training batch's size)


def model_complexity(module: CTRModule, datamodule) -> dict:
    """Forward FLOPs per sample of the final model and of its base, on test rows."""
    test = datamodule.processed.splits["test"]
    rows = slice(0, min(FLOP_BATCH, len(test)))
    return complexity(module.model, test.sparse[rows], test.domain[rows])


def build_results(cfg, module, datamodule, reports, test, wall_time, output_dir) -> dict:
    """The run's record (results.json): run, data, parameters, flops, phases, test."""
    counts = module.model.parameter_counts()
    backbone = counts["backbone"]
    overhead = counts["adapter"] + counts["gate"]
    return {
        "status": "completed",
        "run": {
            **run_fields(cfg),
            "output_dir": str(output_dir),
            "experts": module.model.num_experts if cfg.method.adapter.kind == "moe" else None,
        },
        "schedule": schedule_spec(cfg).to_json(),
        "hyperparameters": hyperparameters(cfg, module),
        "data": datamodule.processed.summary(),
        "parameters": {
            **counts,
            "adapter_overhead": overhead,
            "adapter_overhead_pct": 100.0 * overhead / backbone if backbone else math.nan,
        },
        "flops": model_complexity(module, datamodule),
        "phases": [report.to_json() for report in reports],
        "test": metrics_to_json(test, datamodule.domain_names),
        "wall_time_s": wall_time,
    }


def hyperparameters(cfg: DictConfig, module: CTRModule) -> dict:
    """The settings that differ between the project's defaults and the authors' configs."""
    adapter = module.model.adapter_config
    return {
        "lora_reduce": adapter.lora_reduce if adapter.kind != "none" else None,
        "lora_rank": adapter.lora_rank,
        "embedding_dim": cfg.model.get("embedding_dim"),
        "project_pretrained": cfg.data.get("project_pretrained"),
        "freeze_pretrained": cfg.data.get("freeze_pretrained"),
        "max_epochs": cfg.trainer.get("max_epochs"),
    }


def write_json_atomically(path: Path, payload: dict) -> None:
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(payload, indent=2, default=_json_default))
    os.replace(staging, path)


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


def summary_table(results: dict, reports: list[PhaseReport]) -> str:
    run = results["run"]
    experts = f" · experts={run['experts']}" if run["experts"] else ""
    schedule = f" ({run['schedule']} schedule)" if run.get("schedule") else ""
    lines = [
        f"{run['method']}{schedule} · {run['model']} · {run['data']}{experts} · seed {run['seed']}",
        f"{'phase':<6}{'trains':<10}{'epochs':>7}{'best val WAUC':>15}{'time':>9}{'samples/s':>12}",
    ]
    for r in reports:
        kept = "" if r.kept else "  (not kept: the run's best came back)"
        lines.append(
            f"{r.index:<6}{r.kind:<10}{r.epochs:>7}{r.best_val_wauc:>15.4f}"
            f"{r.wall_time_s:>8.1f}s{r.train_samples_per_s:>12,.0f}{kept}"
        )
    test = results["test"]
    lines.append(
        f"test: WAUC {test['wauc']:.4f} · mean domain AUC {test['mean_auc']:.4f} · "
        f"AUC {test['auc']:.4f} · log loss {test['logloss']:.4f}"
    )
    params, flops = results["parameters"], results["flops"]
    lines.append(
        f"parameters: backbone {params['backbone']:,} · per-domain parts and gate "
        f"{params['adapter_overhead']:,} ({params['adapter_overhead_pct']:.1f}% of backbone)"
    )
    lines.append(
        f"forward FLOPs/sample: {flops['per_sample']:,.0f} (base {flops['base_per_sample']:,.0f},"
        f" +{flops['overhead_pct']:.1f}%) · wall time {results['wall_time_s']:.1f}s"
    )
    return "\n".join(lines)


def log_to_wandb(loggers: list[Logger], results: dict, domain_names: list[str]) -> None:
    wandb_logger = next((lg for lg in loggers if isinstance(lg, WandbLogger)), None)
    if wandb_logger is None:
        return
    import wandb

    run = wandb_logger.experiment
    test = results["test"]
    for key in ("wauc", "mean_auc", "auc", "logloss"):
        run.summary[f"test/{key}"] = test[key]
    rows = [
        [name, d["samples"], d["positive_rate"], d["auc"]] for name, d in test["per_domain"].items()
    ]
    tables = {"test/per_domain": wandb.Table(["domain", "samples", "positive_rate", "auc"], rows)}
    if "gate_weights" in test:
        experts = len(next(iter(test["gate_weights"].values())))
        columns = ["domain"] + [f"expert{e}" for e in range(experts)]
        gate_rows = [[name, *weights] for name, weights in test["gate_weights"].items()]
        tables["test/gate_weights"] = wandb.Table(columns, gate_rows)
        diagnostics = test["gate_diagnostics"]
        run.summary["test/gate_own_weight"] = diagnostics["mean_own_weight"]
        run.summary["test/gate_entropy"] = diagnostics["mean_entropy"]
        tables["test/gate_diagnostics"] = wandb.Table(
            ["domain", "own_weight", "entropy"],
            [
                [name, d["own_weight"], d["entropy"]]
                for name, d in diagnostics["per_domain"].items()
            ],
        )
    run.log(tables)
    run_dir = Path(run.dir).parent
    if run.settings.mode == "offline" or getattr(run.settings, "_offline", False):
        log.info("W&B offline run in %s · upload it with: wandb sync %s", run_dir, run_dir)
    else:
        log.info("W&B run: %s", run.url)


def finish_wandb(loggers: list[Logger]) -> None:
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


# ------------------------------------------------------------------ top level
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


def _train_and_evaluate(cfg: DictConfig, output_dir: Path) -> dict:
    start = time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    threads = job_threads(cfg)
    if threads:
        torch.set_num_threads(threads)
        if str(cfg.trainer.get("strategy", "")).startswith("ddp"):
            # Lightning's DDP launcher sets cores // processes threads unless this is set.
            os.environ["OMP_NUM_THREADS"] = str(threads)
    log.info("torch threads: %d", torch.get_num_threads())
    try:
        configure_allocator(str(cfg.get("allocator", "default")))
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


def to_log_files(text: str) -> None:
    """Append ``text`` to the log files (Hydra's ``run.log``) without the console seeing it
    twice: the final tables are printed, and the log must hold them too."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                handler.stream.write(text + "\n")
                handler.flush()
            finally:
                handler.release()


def write_results(loggers, output_dir: Path, results: dict, module, cfg, datamodule) -> None:
    """model.pt, the W&B summary, the loggers' files, then results.json (global rank 0's job).

    results.json is the commit marker, so it comes last: a kill before it leaves a run that
    resumes from its checkpoints (cleared only after it), never a "completed" run without
    its model.
    """
    save_model(output_dir / "model.pt", module, cfg, datamodule.processed)
    log_to_wandb(loggers, results, datamodule.domain_names)
    for logger in loggers:
        logger.save()
    write_json_atomically(output_dir / "results.json", results)


register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    with watching_interrupts() as interrupted:
        try:
            if is_multirun():
                return run_sweep_job(cfg, output_dir, train_and_evaluate, write_json_atomically)
            return run_single(cfg, output_dir)["test"]["wauc"]
        except BaseException as error:
            exit_for(error, output_dir, interrupted())
    return None


# Writing errors a user fixes outside the program (free space, permissions), then resumes.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


def exit_for(error: BaseException, output_dir: Path, interrupted: bool) -> None:
    """End the process with one line for what a user can fix; re-raise anything else.

    Exit status 2 for a user's mistake or a full disk, 1 for a non-finite loss, 130 for
    Ctrl-C. The message says what to do next, with the exact command to continue.
    """
    if interrupted and isinstance(error, (KeyboardInterrupt, SystemExit)):
        print(f"\nmoe_mlora: interrupted. {how_to_continue(output_dir)}", file=sys.stderr)
        sys.exit(130)
    if isinstance(error, FolderRefused):  # not this run's folder: write nothing into it
        fail(f"moe_mlora: error: {error}", 2)
    if isinstance(error, (DataError, ConfigError, CheckpointError)):
        record_error(output_dir, error)
        fail(f"moe_mlora: error: {error}", 2)
    if isinstance(error, StorageError) or (
        isinstance(error, OSError) and error.errno in STORAGE_ERRNOS
    ):
        fail(f"moe_mlora: error: {error}. Free space, then: {how_to_continue(output_dir)}", 2)
    if isinstance(error, FloatingPointError):
        record_error(output_dir, error)
        kept = output_dir / CHECKPOINT_DIR
        fail(f"moe_mlora: error: {error}; the last good checkpoint is kept in {kept}", 1)
    raise error


def fail(message: str, status: int) -> None:
    print(message, file=sys.stderr)
    sys.exit(status)


def record_error(output_dir: Path, error: BaseException) -> None:
    """``error.txt`` in the run folder, when it can be written."""
    with suppress(OSError):
        (output_dir / "error.txt").write_text(f"{type(error).__name__}: {error}\n")


def how_to_continue(output_dir: Path) -> str:
    """The command that continues this run (or sweep) where it stopped."""
    if is_multirun():
        sweep_dir = HydraConfig.get().sweep.dir
        return (
            "Continue the sweep by running the same command with "
            f"hydra.sweep.dir={sweep_dir}: finished jobs are skipped, interrupted ones resume"
        )
    if not (output_dir / CHECKPOINT_DIR).is_dir():
        return "No epoch had ended, so there is nothing to resume: run the command again"
    overrides = [o for o in task_overrides() if not o.startswith(("resume=", "rerun="))]
    command = shlex.join(["python", "-m", "moe_mlora.run", *overrides, f"resume={output_dir}"])
    return f"Checkpoints are kept in {output_dir / CHECKPOINT_DIR}; continue with:\n  {command}"


@contextmanager
def watching_interrupts() -> Iterator[Callable[[], bool]]:
    """Note a Ctrl-C (SIGINT) before Lightning turns it into ``sys.exit(1)``."""
    seen = []

    def on_interrupt(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, on_interrupt)
    except ValueError:  # not the main thread (a launcher's worker): leave SIGINT alone
        yield lambda: False
        return
    try:
        yield lambda: bool(seen)
    finally:
        signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: launchers that ship the task
    # function to worker processes (joblib's loky) then pickle it by reference, not by value
    # with every global it reaches (some of which, from torch.distributed, cannot be pickled).
    from moe_mlora.precheck import precheck
    from moe_mlora.run import main as importable_main

    check_conf_dir()
    precheck(sys.argv[1:])  # mistyped keys, bad values, every sweep job: before Hydra starts
    importable_main()
