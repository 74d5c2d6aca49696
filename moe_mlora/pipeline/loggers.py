"""The run's loggers: the CSV log, W&B (offline by default) and any extra ones from YAML."""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig

from moe_mlora.config import ConfigError
from moe_mlora.sweep import (
    is_multirun,
    run_name,
    sweep_label,
    task_overrides,
)

log = logging.getLogger("moe_mlora")


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
    return loggers + extra_objects(cfg.logger.get("extra"), "logger.extra", Logger, output_dir)


def save_dir_for(target: str, output_dir: Path | None) -> dict:
    """``{"save_dir": run folder}`` for a class that takes one (loggers), else ``{}``."""
    if output_dir is None:
        return {}
    try:
        parameters = inspect.signature(get_class(str(target))).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return {}
    return {"save_dir": str(output_dir)} if "save_dir" in parameters else {}


def extra_objects(blocks, key: str, kind: type, output_dir: Path | None = None) -> list:
    """The objects of a YAML mapping of ``{name: {_target_: ..., args}}`` blocks.

    A class that takes ``save_dir`` and is given none writes into the run folder. A block
    that cannot be built, or builds something other than a ``kind``, is a ConfigError
    naming it.
    """
    built = []
    for name, block in (blocks or {}).items():
        where = f"{key}.{name}"
        if not isinstance(block, DictConfig) or "_target_" not in block:
            raise ConfigError(f"{where} needs a _target_ (the class to build) and its arguments")
        try:
            options = {} if "save_dir" in block else save_dir_for(block._target_, output_dir)
            obj = instantiate(block, **options)
        except Exception as error:
            raise ConfigError(f"{where}: cannot build {block._target_}: {error}") from error
        if not isinstance(obj, kind):
            raise ConfigError(f"{where}: {block._target_} is not a {kind.__name__}")
        built.append(obj)
    return built


WANDB_TAG_LIMIT = 64  # characters W&B accepts per tag


def wandb_tags(cfg: DictConfig) -> list[str]:
    """``logger.wandb.tags`` plus the job's overrides (``model=deepfm``), to filter runs by."""
    tags = [*cfg.logger.wandb.tags, *task_overrides()]
    return list(dict.fromkeys(tag[:WANDB_TAG_LIMIT] for tag in tags))


def log_to_wandb(loggers: list[Logger], results: dict, domain_names: list[str]) -> None:
    wandb_logger = next((lg for lg in loggers if isinstance(lg, WandbLogger)), None)
    if wandb_logger is None:
        return
    import wandb

    run = wandb_logger.experiment
    test = results["test"]
    for key in ("wauc", "mean_auc", "auc", "logloss"):
        run.summary[f"test/{key}"] = test[key]
    # the tested model's validation scores (the per-epoch val/* series ends at the last epoch)
    for key, value in (results.get("validation") or {}).items():
        run.summary[f"selection/val_{key}"] = value
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
