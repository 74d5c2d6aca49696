"""Checkpoints that let an interrupted run continue where it stopped, with the same result.

A run folder's ``checkpoints/`` holds, written atomically (a temporary file renamed over the
old one, so a kill never leaves a half-written file):

* ``phase{k}.pt`` once phase k has ended: its report, the model's weights after it (best
  weights restored) and the random-number state, so a resumed run skips the phase;
* ``phase{k}-last.ckpt`` after every epoch of the phase in progress: Lightning's checkpoint
  (weights, optimizer, epoch counters) plus, through :class:`EpochCheckpoint`'s state, the
  early-stopping state, the batches' epoch counters and the random-number state.

Each file carries the run's config fingerprint; a resume with another config is refused.
Under DDP only global rank 0 writes (the weights are the same on every rank), and every
rank reads the same files when it resumes, so the run folder must be on a filesystem all
processes see.
Resuming from ``phase{k}-last.ckpt`` replays nothing: the next epoch draws the same
shuffles and dropout masks as it would have, so on CPU the final metrics equal an
uninterrupted run's.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from moe_mlora.distributed import all_gather_object, barrier, is_global_zero, process_slot
from moe_mlora.runfolder import writing

log = logging.getLogger("moe_mlora")

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (corrupt, or from another config); says which and why."""


def rng_state() -> dict[str, Any]:
    """Every global random-number state a training step can draw from (dropout, numpy).

    Tensors and plain types only, so a checkpoint loads with ``weights_only=True``: numpy's
    state is a tuple holding an ndarray, stored here as a tensor and its scalars.
    """
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    random.setstate(state["python"])


def rng_record() -> dict[str, Any]:
    """The random state for a checkpoint: rank 0's as ``rng``, every rank's as ``rng_per_rank``.

    Under DDP the ranks' generators drift apart (a shard one row longer draws more dropout
    numbers), so each rank must get its own state back for a resumed run to equal an
    uninterrupted one. Every rank must call this (it gathers).
    """
    states = all_gather_object(rng_state())
    return {"rng": states[0], "rng_per_rank": states}


def restore_rng(record: dict[str, Any]) -> None:
    """Set this rank's random state from a :func:`rng_record` (or an older, single-state one)."""
    rank, world = process_slot()
    states = record.get("rng_per_rank")
    set_rng_state(states[rank] if states and len(states) == world else record["rng"])


def save_atomically(payload: dict, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename it over ``path``.

    A failed write (a full disk) leaves the previous ``path`` as it was and no temporary
    file, and raises StorageError naming ``path``.
    """
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(payload, staging)
            os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def load_checkpoint_file(path: Path) -> dict:
    """A checkpoint's content on the CPU, loaded as weights only: nothing in it can run code.

    Our checkpoints hold tensors and plain containers alone (see :func:`rng_state`), so
    ``weights_only=True`` reads them. A file that asks to build any other object (a planted
    pickle), or is corrupt, is a CheckpointError naming it, not a torch traceback.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({loading_error_gist(error)}); it was not "
            "run. Delete it to restart that phase from its beginning"
        ) from error


def loading_error_gist(error: Exception) -> str:
    """The first line of a torch loading error: its full text lists internals, not the fix."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


class RunCheckpoints:
    """The checkpoints of one run folder: which phases ended, and where the current one stands."""

    def __init__(self, output_dir: Path, fingerprint: str) -> None:
        self.folder = Path(output_dir) / CHECKPOINT_DIR
        self.fingerprint = fingerprint

    def phase_file(self, index: int) -> Path:
        return self.folder / f"phase{index}.pt"

    def epoch_file(self, index: int) -> Path:
        return self.folder / f"phase{index}-last.ckpt"

    def exists(self) -> bool:
        return self.folder.is_dir() and any(self.folder.iterdir())

    def check(self, payload: dict, path: Path) -> dict:
        found = payload.get("config_fingerprint")
        if found != self.fingerprint:
            raise CheckpointError(
                f"{path} belongs to another config (fingerprint {found}, this run's is "
                f"{self.fingerprint}); resume with the overrides the run was started with, or "
                f"delete {self.folder} (rerun=true in a sweep) to start afresh"
            )
        return payload

    def save_phase(
        self, index: int, report: dict, model: torch.nn.Module, carried: dict | None = None
    ) -> None:
        """Record that phase ``index`` ended; on global rank 0 only, the others wait for it.

        ``carried``: what later phases need besides the weights (the run's best weights
        and score, a carried optimizer state).

        The barrier keeps the other ranks from starting the next phase (and from checking
        its files) while rank 0 is still writing this one's.
        """
        rng = rng_record()
        if is_global_zero():
            payload = {
                "config_fingerprint": self.fingerprint,
                "report": report,
                "model": model.state_dict(),
                "carried": carried,
                **rng,
            }
            save_atomically(payload, self.phase_file(index))
            self.epoch_file(index).unlink(missing_ok=True)
        barrier()

    def finished_phase(self, index: int) -> dict | None:
        """Phase ``index``'s end record, if it ended in an earlier attempt."""
        path = self.phase_file(index)
        if not path.is_file():
            return None
        return self.check(load_checkpoint_file(path), path)

    def resume_path(self, index: int) -> Path | None:
        """Lightning's last epoch checkpoint of phase ``index``, checked, if there is one."""
        path = self.epoch_file(index)
        if not path.is_file():
            return None
        checkpoint = load_checkpoint_file(path)
        self.check(checkpoint.get("moe_mlora", {}), path)
        return path

    def clear(self) -> None:
        """Remove the checkpoints once the run is complete (results.json and model.pt remain).

        Global rank 0 only: under DDP the other ranks never wrote them.
        """
        if not is_global_zero():
            return
        for path in self.folder.glob("*"):
            path.unlink()
        if self.folder.is_dir():
            self.folder.rmdir()


class EpochCheckpoint(L.Callback):
    """Writes ``phase{k}-last.ckpt`` after each epoch's validation; restores what Lightning doesn't.

    Lightning's checkpoint covers weights, optimizer and epoch counters, and the state of
    callbacks that define ``state_dict``. This callback adds the train batches' epoch
    counter (their shuffle seeds), the experts still active in phase 2, the global
    random-number state (dropout) and the config fingerprint. Put it last in the callback
    list, so the early-stopping callbacks have updated their state before it is saved.
    """

    def __init__(self, path: Path, fingerprint: str, train_batches: Any) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.train_batches = train_batches

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with writing(self.path):
                self.path.parent.mkdir(parents=True, exist_ok=True)
                trainer.save_checkpoint(staging, weights_only=False)
                if trainer.is_global_zero:
                    os.replace(staging, self.path)
        finally:
            if trainer.is_global_zero:
                staging.unlink(missing_ok=True)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["moe_mlora"] = {
            "config_fingerprint": self.fingerprint,
            **rng_record(),  # called on every rank: Lightning dumps the checkpoint on all
            "batches_epoch": self.train_batches.epoch,
            "active": sorted(getattr(self.train_batches, "active", [])),
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        state = checkpoint["moe_mlora"]
        self.train_batches.epoch = state["batches_epoch"]
        if hasattr(self.train_batches, "active"):
            self.train_batches.active = set(state["active"])
        restore_rng(state)
