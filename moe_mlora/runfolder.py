"""Who may write into a run folder, and whether it already holds a finished run.

A run folder is owned by one process at a time (:func:`owning`): an advisory ``flock`` on
``.moe_mlora.lock``, released by the kernel when the process ends, so a killed run never
leaves a lock that blocks its rerun. A second writer (another sweep into the same
``hydra.sweep.dir``, a second ``resume=``) is refused with the folder and the holder's pid.

A folder's run is finished when ``results.json`` says ``completed`` *and* ``model.pt``
exists: results.json is written last, so a kill between the two writes leaves a run that
is resumed, not skipped. A finished run is never overwritten by another config.

Hydra writes ``.hydra/*.yaml`` into the folder before our code runs, so a refused writer has
already replaced the owner's record: :func:`keep_hydra_record` copies the owner's files to
``.hydra/owner/`` when it starts, and a refused writer puts them back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moe_mlora.config import ConfigError
from moe_mlora.distributed import is_global_zero
from moe_mlora.pipeline.schema import RunRecord

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer per folder is then on the user
    fcntl = None

log = logging.getLogger("moe_mlora")

LOCK_FILE = ".moe_mlora.lock"
HYDRA_RECORD = (".hydra", "owner")
_held: dict[Path, int] = {}  # folders this process owns, and their lock's file descriptor


class StorageError(OSError):
    """A file of the run could not be written (a full or read-only disk); says which."""


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failed write of ``path`` (OSError, or torch.save's RuntimeError) into StorageError."""
    try:
        yield
    except StorageError:
        raise
    except (OSError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if isinstance(error, RuntimeError) and "writ" not in reason.lower():
            raise  # not a write failure
        raise StorageError(f"could not write {path}: {reason}") from error


class FolderRefused(ConfigError):
    """The run folder is not this run's to write: another process holds it, or another
    config finished there. Nothing is written into it."""


class FolderBusy(FolderRefused):
    """Another live process writes into the run folder."""


@contextmanager
def owning(folder: Path) -> Iterator[None]:
    """Hold ``folder`` for this process while the block runs; FolderBusy if another holds it.

    Re-entrant within a process. Under DDP only global rank 0 locks (it alone writes).
    """
    folder = Path(folder).resolve()
    if folder in _held or fcntl is None or not is_global_zero():
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _read_holder(folder / LOCK_FILE)
        os.close(descriptor)
        restore_hydra_record(folder)
        raise FolderBusy(
            f"{folder} is in use by another moe_mlora process ({holder}); wait for it to end, "
            "or write this run elsewhere (hydra.run.dir=... or hydra.sweep.dir=...)"
        ) from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, json.dumps(_holder_record()).encode())
    _held[folder] = descriptor
    try:
        yield
    finally:
        del _held[folder]
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


def _holder_record() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv)[:300],
    }


def _read_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return (
            f"pid {holder['pid']} on {holder['host']} since {holder['since']}: {holder['command']}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"


def completed_run(folder: Path) -> dict | None:
    """The folder's results when its run finished: status completed and model.pt present."""
    try:
        results = json.loads((Path(folder) / "results.json").read_text())
        record = RunRecord.from_json(results)
    except (OSError, ValueError):  # unreadable, or not a run's record (RecordError)
        return None
    if not record.completed:
        return None
    if not (Path(folder) / "model.pt").is_file():
        log.warning("%s: results.json without model.pt (a run killed while saving)", folder)
        return None
    return results


def refuse_another_config(folder: Path, finished: dict, fingerprint: str) -> None:
    """FolderRefused when the finished run in ``folder`` is of a config other than this one."""
    run = finished.get("run", {})
    earlier = run.get("config_fingerprint")
    if earlier == fingerprint:
        return
    restore_hydra_record(folder)
    overrides = " ".join(run.get("overrides") or []) or "(none)"
    raise FolderRefused(
        f"{folder} holds a finished run of another config (fingerprint {earlier}, this one's "
        f"is {fingerprint}; its overrides: {overrides}); it is not overwritten. Use another "
        "folder, or delete this one to run there"
    )


def keep_hydra_record(folder: Path) -> None:
    """Copy the ``.hydra/*.yaml`` Hydra wrote for this run, for a refused writer to restore."""
    hydra_dir = Path(folder) / HYDRA_RECORD[0]
    if not is_global_zero() or not hydra_dir.is_dir():
        return
    kept = hydra_dir / HYDRA_RECORD[1]
    kept.mkdir(exist_ok=True)
    for path in hydra_dir.glob("*.yaml"):
        shutil.copy2(path, kept / path.name)


def restore_hydra_record(folder: Path) -> None:
    """Put back the owner's ``.hydra/*.yaml`` that a refused run's Hydra overwrote."""
    kept = Path(folder) / HYDRA_RECORD[0] / HYDRA_RECORD[1]
    for path in kept.glob("*.yaml") if kept.is_dir() else []:
        shutil.copy2(path, kept.parent / path.name)


def finished_job(folder: Path, fingerprint: str) -> dict | None:
    """The finished results of this job in ``folder``; FolderRefused when they are another's."""
    finished = completed_run(folder)
    if finished is not None:
        refuse_another_config(folder, finished, fingerprint)
    return finished
