"""Train and test one (data, model, method) combination: ``python -m moe_mlora.run [overrides]``.

Examples::

    python -m moe_mlora.run                                   # generated MovieLens-format data
    python -m moe_mlora.run data=movielens_gender data.root=/data/ml-1m method=moe_mlora experts=4
    python -m moe_mlora.run -m method=base,mlora,moe_mlora    # a sweep, one folder per job
    python -m moe_mlora.run --help                            # config groups and keys

Each run writes into its own folder: ``.hydra/config.yaml`` (the resolved
config), ``results.json``, ``csv/metrics.csv`` and a W&B run (offline unless
``logger.wandb.mode=online``).

This module is the command line only: what a run does is in :mod:`moe_mlora.pipeline`
(``runner.train_and_evaluate``); here are Hydra's entry point, the exit status and the one
line a user sees for each kind of error, and Ctrl-C.
"""

from __future__ import annotations

import errno
import logging
import shlex
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from moe_mlora.config import CONF_DIR, ConfigError, check_conf_dir, register_resolvers
from moe_mlora.data.processed import DataError
from moe_mlora.pipeline.results import write_json_atomically
from moe_mlora.pipeline.runner import run_single, train_and_evaluate
from moe_mlora.runfolder import (
    FolderRefused,
    StorageError,
)
from moe_mlora.sweep import (
    is_multirun,
    run_sweep_job,
    task_overrides,
)
from moe_mlora.training.checkpoints import CHECKPOINT_DIR, CheckpointError

log = logging.getLogger("moe_mlora")

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
    from moe_mlora.precheck import precheck, sweep_safe_argv
    from moe_mlora.run import main as importable_main

    check_conf_dir()
    precheck(sys.argv[1:])  # mistyped keys, bad values, every sweep job: before Hydra starts
    sys.argv[1:] = sweep_safe_argv(sys.argv[1:])
    importable_main()
