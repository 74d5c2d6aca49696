"""Every config value a run needs, checked before any work: one ConfigError naming the key.

:func:`check_run_config` runs at the start of every run (and, through
:mod:`moe_mlora.precheck`, for every job of a sweep before the sweep launches). A message
says which key, what it got and what would work, e.g. ``optimizer.lr=-0.001 must be a
number > 0 (e.g. optimizer.lr=0.001)``. Nothing here reads a data file: the data checks
only look whether the files a source needs are there.
"""

from __future__ import annotations

import difflib
import math
import shutil
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from moe_mlora.config import ConfigError
from moe_mlora.data.datamodule import MOVIELENS_NO_ROOT, TABLE_NO_PATH
from moe_mlora.data.processed import DataError
from moe_mlora.models.layers import DROPOUT_MASKS


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def integer(key: str, value: Any, minimum: int, example: str, optional: bool = False) -> None:
    """``value`` must be an integer >= ``minimum`` (or null when ``optional``)."""
    if value is None and optional:
        return
    if not _is_int(value) or value < minimum:
        null = " or null" if optional else ""
        raise ConfigError(
            f"{key}={value!r} must be an integer >= {minimum}{null} (e.g. {key}={example})"
        )


def number(key: str, value: Any, minimum: float, example: str, strict: bool) -> None:
    """``value`` must be a finite number > ``minimum`` (>= when not ``strict``)."""
    if not _is_number(value) or (value <= minimum if strict else value < minimum):
        sign = ">" if strict else ">="
        raise ConfigError(
            f"{key}={value!r} must be a number {sign} {minimum:g} (e.g. {key}={example})"
        )


def check_values(cfg: DictConfig) -> None:
    """The numbers: seed, expert counts, threads, learning rate, batch sizes, epochs, ranks."""
    integer("seed", cfg.seed, 0, "1")
    mask = cfg.get("dropout_mask", "bits")
    if mask not in DROPOUT_MASKS:
        raise ConfigError(
            f"dropout_mask={mask!r} must be one of {', '.join(DROPOUT_MASKS)} "
            "(e.g. dropout_mask=bits)"
        )
    integer("experts", cfg.get("experts"), 1, "8", optional=True)
    integer("experts_per_domain", cfg.get("experts_per_domain"), 1, "2", optional=True)
    integer("threads", cfg.get("threads"), 1, "2", optional=True)
    number("optimizer.lr", cfg.optimizer.lr, 0.0, "0.001", strict=True)
    number("optimizer.weight_decay", cfg.optimizer.weight_decay, 0.0, "0.0", strict=False)
    integer("data.batch_size", cfg.data.get("batch_size"), 1, "1024")
    integer("data.eval_batch_size", cfg.data.get("eval_batch_size", 1), 1, "65536")
    epochs = cfg.trainer.get("max_epochs")
    if epochs != -1:
        integer("trainer.max_epochs", epochs, 1, "50")
    stopping = cfg.callbacks.early_stopping
    integer("callbacks.early_stopping.patience", stopping.patience, 1, "3")
    number("callbacks.early_stopping.min_delta", stopping.min_delta, 0.0, "0.0", strict=False)
    adapter = cfg.method.adapter
    if adapter.get("kind", "none") != "none":
        integer("method.adapter.lora_reduce", adapter.get("lora_reduce"), 1, "32")
    integer("method.adapter.lora_rank", adapter.get("lora_rank"), 1, "8", optional=True)
    bins = cfg.get("evaluation", {}).get("auc_bins")
    integer("evaluation.auc_bins", bins, 2, "65536", optional=True)


def precisions() -> list:
    """The ``trainer.precision`` values this Lightning accepts."""
    try:
        from lightning.fabric.connector import _PRECISION_INPUT
    except ImportError:  # another Lightning: let the Trainer judge
        return []

    def flat(kind) -> list:
        return [v for a in typing.get_args(kind) for v in (flat(a) if typing.get_args(a) else [a])]

    return flat(_PRECISION_INPUT)


def check_trainer_values(cfg: DictConfig) -> None:
    """``trainer.precision`` and ``trainer.devices`` as Lightning will accept them."""
    precision = cfg.trainer.get("precision", "32-true")
    allowed = precisions()
    if allowed and precision not in allowed:
        close = difflib.get_close_matches(str(precision), [str(a) for a in allowed], n=1)
        hint = f"did you mean trainer.precision={close[0]}? " if close else ""
        raise ConfigError(
            f"trainer.precision={precision!r} is not a precision; {hint}"
            "use 32-true (default), bf16-mixed or 16-mixed"
        )
    devices = cfg.trainer.get("devices", "auto")
    values = OmegaConf.to_container(devices) if OmegaConf.is_list(devices) else devices
    parts = values if isinstance(values, list) else str(values).strip().rstrip(",").split(",")
    if str(values) != "auto" and not all(str(p).strip().lstrip("-").isdigit() for p in parts):
        raise ConfigError(
            f"trainer.devices={values!r} must be a count (1), -1 (all), auto, or a list of "
            "device ids ([0,1])"
        )


def check_accelerator(cfg: DictConfig) -> None:
    """``trainer=gpu`` (or accelerator=gpu/cuda/mps) on a machine without one."""
    accelerator = str(cfg.trainer.get("accelerator", "auto")).lower()
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        build = "has no CUDA support" if torch.version.cuda is None else "finds no CUDA device"
        raise ConfigError(
            f"trainer.accelerator={accelerator} (trainer=gpu): this torch "
            f"({torch.__version__}) {build}. Drop trainer=gpu to train on the CPU, or install "
            "a CUDA build of torch (see the README's Install section)"
        )
    if accelerator == "mps":
        mps = getattr(torch.backends, "mps", None)
        if not (mps and mps.is_available()):
            raise ConfigError(
                "trainer.accelerator=mps: no Apple GPU here; use trainer.accelerator=cpu"
            )


def check_launcher(hydra_cfg: DictConfig | None) -> None:
    """``hydra/launcher=slurm`` where SLURM's sbatch is not on PATH."""
    if hydra_cfg is None:
        return
    target = str(OmegaConf.select(hydra_cfg, "launcher._target_", default="") or "")
    if "submitit" in target and "Slurm" in target and shutil.which("sbatch") is None:
        raise ConfigError(
            "hydra/launcher=slurm needs SLURM (no sbatch on PATH): run the sweep from the "
            "cluster's login node, or use hydra/launcher=parallel for local processes"
        )


# --------------------------------------------------------------- data sources
def _movielens_files(data: DictConfig) -> None:
    from moe_mlora.data.movielens import detect_format

    if not data.get("root"):
        raise DataError(MOVIELENS_NO_ROOT)
    detect_format(Path(str(data.root)).expanduser())


def _taobao_files(data: DictConfig) -> None:
    from moe_mlora.data.taobao import check_root, missing_root_message

    root = data.get("root")
    if data.get("generate_if_missing") and (not root or not Path(str(root)).exists()):
        return
    if not root:
        raise DataError(missing_root_message())
    check_root(Path(str(root)).expanduser())


def _table_files(data: DictConfig) -> None:
    from moe_mlora.data.table_options import resolve_files

    path = data.get("path")
    if not path:
        raise DataError(TABLE_NO_PATH)
    resolve_files(OmegaConf.to_container(path) if OmegaConf.is_list(path) else path)


SOURCE_FILES: dict[str, Callable[[DictConfig], None]] = {
    "movielens": _movielens_files,
    "taobao": _taobao_files,
    "table": _table_files,
}


def check_data_files(cfg: DictConfig) -> None:
    """The files ``data`` reads are there (a DataError naming them otherwise); reads none."""
    check = SOURCE_FILES.get(str(cfg.data.get("source", "")))
    if check is not None:
        check(cfg.data)


def check_folders(cfg: DictConfig, hydra_cfg: DictConfig | None, multirun: bool) -> None:
    """The run (or sweep) folder and ``resume`` must be folders, not files."""
    named = [("resume", cfg.get("resume"))]
    if hydra_cfg is not None:
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        named.append((key, OmegaConf.select(hydra_cfg, key.removeprefix("hydra."))))
    for key, value in named:
        if value is not None and Path(str(value)).exists() and not Path(str(value)).is_dir():
            raise ConfigError(f"{key}={value} is a file; a run folder must be a folder")


def check_run_config(
    cfg: DictConfig, hydra_cfg: DictConfig | None = None, multirun: bool = False
) -> None:
    """Everything about a run's config that can be known before any work."""
    check_values(cfg)
    check_trainer_values(cfg)
    check_accelerator(cfg)
    if multirun:
        check_launcher(hydra_cfg)
    check_folders(cfg, hydra_cfg, multirun)
    check_data_files(cfg)


# ---------------------------------------------------------------------- memory
BYTES_PER_PARAMETER = 16  # fp32 weight, gradient and Adam's two moments
ACTIVATION_COPIES = 4  # the forward outputs kept for backward, and their gradients


def available_memory(accelerator: str) -> tuple[int, str] | None:
    """Bytes free where the model will live: the GPU's, else the machine's available RAM."""
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free), "GPU memory free"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "memory available"
    except OSError:
        pass
    return None


def estimated_bytes(parameters: int, batch_size: int, experts: int, widths: list[int]) -> int:
    """Training memory of a model: its parameters' state, plus each expert's activations."""
    activations = batch_size * max(experts, 1) * sum(widths) * 4 * ACTIVATION_COPIES
    return parameters * BYTES_PER_PARAMETER + activations


def check_memory(cfg: DictConfig, parameters: int, experts: int, widths: list[int]) -> None:
    """Refuse an expert count whose training memory would not fit, before allocating it."""
    batch = int(cfg.data.get("batch_size", 1024))
    need = estimated_bytes(parameters, batch, experts, widths)
    have = available_memory(str(cfg.trainer.get("accelerator", "auto")).lower())
    if have is None or need <= have[0]:
        return
    gib = 1024**3
    raise ConfigError(
        f"experts={experts} needs about {need / gib:.1f} GiB to train ({parameters:,} "
        f"parameters with their gradients and Adam state, plus every expert's activations at "
        f"data.batch_size={batch}) but this machine has {have[0] / gib:.1f} GiB {have[1]}; "
        "lower experts (or experts_per_domain), method.adapter.lora_rank or data.batch_size"
    )
