"""Callbacks the phase schedule attaches to each phase's Trainer.

Best weights are kept in memory (the models are small) and restored when the
phase ends, so every phase hands the next one its best, not its last, state.

Under DDP every rank runs these callbacks on its own copy. The values they monitor come
from metrics gathered across the processes (``DomainAUC``, phase 2's per-expert rows), so
every rank takes the same stopping decisions, and its snapshots equal the other ranks'
(DDP keeps the weights identical): each rank restores the same best weights.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from moe_mlora.data.batches import ExpertBatches

log = logging.getLogger("moe_mlora")


def persistent_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers a module saves with its weights (e.g. STAR's moving statistics).

    A model's state is its parameters *and* these: restoring the best epoch's parameters
    beside the last epoch's moving statistics would evaluate a model that never existed.
    Non-persistent buffers (pretrained tables, index constants) never change and are left out.
    """
    found = []
    for prefix, child in module.named_modules():
        for name, buffer in child.named_buffers(recurse=False):
            if buffer is not None and name not in child._non_persistent_buffers_set:
                found.append((f"{prefix}.{name}" if prefix else name, buffer))
    return found


def training_state(module: torch.nn.Module) -> list[torch.Tensor]:
    """What a phase can change: its trainable parameters and the persistent buffers."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    return trainable + [buffer for _, buffer in persistent_buffers(module)]


def snapshot(parameters: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in parameters]


def restore(parameters: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for parameter, value in zip(parameters, saved, strict=True):
            parameter.copy_(value)


def _improved(value: float, best: float, min_delta: float) -> bool:
    return not math.isnan(value) and (math.isnan(best) or value > best + min_delta)


class BestWeights(L.Callback):
    """Early stopping on a validation metric (higher is better) that restores the best weights.

    Trainable parameters and persistent buffers (moving statistics) are saved: frozen
    parameters cannot change in the phase.

    ``to_beat`` and ``fallback`` make the phase part of a run-wide keep-best: the phase
    counts as improving only above ``to_beat`` (the run's best score so far), and if it
    never gets there, ``fallback()`` (loading the run's best weights) runs when it ends.
    ``revert``: after an epoch that does not improve, the best weights so far come back
    (the reference's rule) instead of training on from the last epoch's.
    ``seen_best`` / ``seen_metrics`` keep the phase's own best epoch whether or not it beat
    ``to_beat``, for its report.
    """

    def __init__(
        self,
        monitor: str,
        patience: int = 3,
        min_delta: float = 0.0,
        revert: bool = False,
        to_beat: float = math.nan,
        fallback: Callable[[], None] | None = None,
    ) -> None:
        if patience < 1:
            raise ValueError(f"callbacks.early_stopping.patience must be >= 1, got {patience}")
        self.monitor = monitor
        self.patience = patience
        self.min_delta = min_delta
        self.revert = revert
        self.fallback = fallback
        self.best = to_beat
        self.best_epoch = -1
        self.best_metrics: dict | None = None
        self.seen_best = math.nan
        self.seen_epoch = -1
        self.seen_metrics: dict | None = None
        self.epochs = 0
        self.reverted = 0
        self._wait = 0
        self._saved: list[torch.Tensor] | None = None
        self._parameters: list[torch.nn.Parameter] = []

    @property
    def improved(self) -> bool:
        """Whether an epoch beat ``to_beat`` (with nothing to beat: whether any epoch scored)."""
        return self._saved is not None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._parameters = training_state(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.epochs += 1
        value = float(trainer.callback_metrics.get(self.monitor, math.nan))
        if _improved(value, self.seen_best, 0.0):
            self.seen_best, self.seen_epoch = value, trainer.current_epoch
            self.seen_metrics = getattr(pl_module, "last_val", None)
        if _improved(value, self.best, self.min_delta):
            self.best, self.best_epoch, self._wait = value, trainer.current_epoch, 0
            self.best_metrics = getattr(pl_module, "last_val", None)
            self._saved = snapshot(self._parameters)
            return
        self._wait += 1
        if self.revert:
            self._restore_best()
        if self._wait >= self.patience:
            trainer.should_stop = True

    def _restore_best(self) -> None:
        if self._saved is not None:
            self._restore_saved()
            self.reverted += 1
        elif self.fallback is not None:
            self.fallback()
            self.reverted += 1

    def _restore_saved(self) -> None:
        # A checkpoint written before buffers were kept holds the parameters only; they
        # come first in ``_parameters``, and the buffers then stay as they are.
        restore(self._parameters[: len(self._saved)], self._saved)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._wait >= self.patience:  # resumed from the epoch that decided to stop
            trainer.should_stop = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._saved is not None:
            self._restore_saved()
        elif self.fallback is not None:
            self.fallback()

    def state_dict(self) -> dict:
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
            "seen": (self.seen_best, self.seen_epoch, self.seen_metrics),
            "epochs": self.epochs,
            "reverted": self.reverted,
            "wait": self._wait,
            "saved": self._saved,
        }

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.best_metrics, self.epochs = state["best_metrics"], state["epochs"]
        self._wait, self._saved = state["wait"], state["saved"]
        if "seen" in state:  # checkpoints written before run-wide keep-best lack these
            self.seen_best, self.seen_epoch, self.seen_metrics = state["seen"]
            self.reverted = state["reverted"]


@dataclass
class ExpertRecord:
    """Phase-2 bookkeeping for one expert."""

    domains: list[int]
    best: float = math.nan
    best_epoch: int = -1
    epochs: int = 0
    wait: int = 0
    saved: list[torch.Tensor] | None = field(default=None, repr=False)


class ExpertEarlyStopping(L.Callback):
    """Per-expert early stopping and best weights for phase 2.

    An expert whose validation WAUC (on its own domains) has not improved for
    ``patience`` epochs leaves ``batches.active``: it gets no more data and its
    parameters no more updates. The phase ends when no expert is active, and
    each expert gets back its own best weights.
    """

    def __init__(
        self,
        batches: ExpertBatches,
        assignment: list[list[int]],
        patience: int = 3,
        min_delta: float = 0.0,
    ) -> None:
        self.batches = batches
        self.patience = patience
        self.min_delta = min_delta
        self.records = {e: ExpertRecord(list(domains)) for e, domains in enumerate(assignment)}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        scores = pl_module.last_expert_val
        for expert in sorted(self.batches.active):
            record = self.records[expert]
            record.epochs += 1
            value = float(scores[expert])
            if _improved(value, record.best, self.min_delta):
                record.best, record.best_epoch, record.wait = value, trainer.current_epoch, 0
                record.saved = snapshot(pl_module.model.expert_tensors(expert))
                continue
            record.wait += 1
            if record.wait >= self.patience:
                self.batches.active.discard(expert)
        if not self.batches.active:
            trainer.should_stop = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.batches.active:  # resumed from the epoch that stopped the last expert
            trainer.should_stop = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for expert, record in self.records.items():
            if record.saved is not None:
                restore(pl_module.model.expert_tensors(expert), record.saved)

    def state_dict(self) -> dict:
        return {"records": {e: asdict(r) for e, r in self.records.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.records = {int(e): ExpertRecord(**r) for e, r in state["records"].items()}


class TrainThroughput(L.Callback):
    """Training samples and time, validation excluded, measured two ways.

    ``seconds`` sums the training steps alone (forward, backward, optimizer);
    ``wall_seconds`` sums, per epoch, the time from the epoch's start to its
    last batch's end, so batch fetching and Lightning's loop are included
    (the fair figure against another library's whole training loop).
    """

    def __init__(self) -> None:
        self.samples = 0
        self.seconds = 0.0
        self.wall_seconds = 0.0
        self._start = 0.0
        self._epoch_start: float | None = None
        self._last_end: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start, self._last_end = time.perf_counter(), None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last_end = time.perf_counter()
        self.seconds += self._last_end - self._start
        self.samples += len(batch["label"])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._epoch_start is not None and self._last_end is not None:
            self.wall_seconds += self._last_end - self._epoch_start
        self._epoch_start = None

    def state_dict(self) -> dict:
        return {"samples": self.samples, "seconds": self.seconds, "wall": self.wall_seconds}

    def load_state_dict(self, state: dict) -> None:
        self.samples, self.seconds, self.wall_seconds = (
            state["samples"],
            state["seconds"],
            state["wall"],
        )

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds else math.nan


class EpochLog(L.Callback):
    """One log line per epoch when no progress bar shows (pipes, nohup, SLURM, CI).

    ``phase 1 (joint) epoch 3/50 · train loss 0.4312 · val WAUC 0.8123 · 41,234 samples/s
    · 2.1s``: the run is never silent for longer than an epoch, and ``run.log`` keeps it.
    """

    def __init__(self, index: int, kind: str, monitor: str = "wauc") -> None:
        self.label = f"phase {index} ({kind})"
        self.prefix = f"phase{index}"
        self.monitor = monitor
        self._start = 0.0
        self._samples = 0

    def on_train_start(self, trainer, pl_module) -> None:
        log.info("%s: training, at most %d epochs", self.label, trainer.max_epochs)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._samples = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._samples += len(batch["label"])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        metrics = trainer.callback_metrics
        seconds = time.perf_counter() - self._start
        parts = [f"{self.label} epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        for name, key in (
            ("train loss", f"{self.prefix}/train/loss"),
            (f"val {self.monitor.upper()}", f"{self.prefix}/val/{self.monitor}"),
        ):
            if key in metrics:
                parts.append(f"{name} {float(metrics[key]):.4f}")
        parts.append(f"{self._samples / seconds if seconds else 0:,.0f} samples/s")
        parts.append(f"{seconds:.1f}s")
        log.info(" · ".join(parts))


class PhaseProgressBar(TQDMProgressBar):
    """Lightning's bar, with the phase in its description: ``phase 2 (experts) epoch 3``."""

    def __init__(self, index: int, kind: str) -> None:
        super().__init__()
        self.label = f"phase {index} ({kind})"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self.train_progress_bar.set_description(f"{self.label} epoch {trainer.current_epoch + 1}")
