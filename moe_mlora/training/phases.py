"""The training schedules: one joint phase for base and MLoRA, three for MoE-MLoRA.

MoE-MLoRA (METHOD.md): (1) the backbone alone on all domains; (2) the backbone
frozen, each expert specialised on its assigned domains with the gate off;
(3) backbone and experts frozen, the gate trained on all domains with the full
mixture. Each phase gets a fresh Trainer and optimizer, early stopping on
validation WAUC, and ends with its best weights restored.

Under DDP (``trainer=ddp``) every process runs the same schedule: each phase's Trainer
wraps the module anew (so DDP sees that phase's trainable parameters) and the batches
shard themselves (:mod:`moe_mlora.data.batches`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import torch

from moe_mlora.data.batches import expert_assignment, expert_rows
from moe_mlora.data.datamodule import MultiDomainDataModule
from moe_mlora.training.callbacks import (
    BestWeights,
    ExpertEarlyStopping,
    ExpertRecord,
    TrainThroughput,
)
from moe_mlora.training.checkpoints import EpochCheckpoint, RunCheckpoints, restore_rng
from moe_mlora.training.module import CTRModule, Phase

log = logging.getLogger("moe_mlora")

METHODS = ("base", "mlora", "moe_mlora")
# The model's routing in each phase of a method (see CTRModel.routing).
PHASE_ROUTING = {
    "base": ["off"],
    "mlora": ["domain"],
    "moe_mlora": ["off", "expert", "mixture"],
}
PHASE2_MODES = ("parallel", "sequential")

# Builds a Trainer for a phase with the given callbacks; `reload` asks for the
# train loader's length to be re-read every epoch (phase 2's shrinks).
TrainerFactory = Callable[[Phase, list[L.Callback], bool], L.Trainer]


@dataclass
class PhaseReport:
    """What one phase did: epochs, best validation metrics, time and throughput."""

    index: int
    kind: str
    epochs: int = 0
    best_epoch: int = -1
    best_val_wauc: float = math.nan
    best_val: dict | None = None
    wall_time_s: float = 0.0
    train_samples: int = 0
    train_seconds: float = 0.0  # training steps alone
    train_wall_seconds: float = 0.0  # per epoch, start to last batch (see TrainThroughput)
    train_samples_per_s: float = math.nan
    experts: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> PhaseReport:
        return cls(**values)


def metrics_to_json(result: dict | None, domain_names: list[str]) -> dict | None:
    """A DomainAUC result as plain JSON: headline numbers and a per-domain table."""
    if result is None:
        return None
    per_domain = {}
    for i, name in enumerate(domain_names):
        samples = int(result["count_per_domain"][i])
        positives = int(result["positives_per_domain"][i])
        auc = float(result["auc_per_domain"][i])
        per_domain[name] = {
            "auc": None if math.isnan(auc) else auc,
            "samples": samples,
            "positive_rate": positives / samples if samples else None,
        }
    out = {key: float(result[key]) for key in ("wauc", "mean_auc", "auc", "logloss")}
    if "wauc_error_bound" in result:  # binned AUC (evaluation.auc_bins): its worst-case error
        out["wauc_error_bound"] = float(result["wauc_error_bound"])
        out["auc_error_bound"] = float(result["overall_auc_error_bound"])
    out["per_domain"] = per_domain
    out["undefined_domains"] = list(result.get("undefined_domains", []))
    if "gate_weights" in result:
        out["gate_weights"] = {
            name: row
            for name, row in zip(domain_names, result["gate_weights"].tolist(), strict=True)
        }
    return out


def set_trainable(
    model: torch.nn.Module,
    backbone: bool,
    experts: bool | Iterable[int],
    gate: bool,
) -> None:
    """Freeze or unfreeze whole parameter groups (weights and biases alike).

    Pretrained embedding tables are buffers, not parameters, so unfreezing the
    backbone never makes them trainable.
    """

    def apply(parameters: Iterable[torch.nn.Parameter], on: bool) -> None:
        for parameter in parameters:
            parameter.requires_grad_(on)

    apply(model.backbone_parameters(), backbone)
    apply(model.gate_parameters(), gate)
    if isinstance(experts, bool):
        apply(model.expert_parameters(), experts)
        return
    chosen = set(experts)
    for expert in range(model.num_experts):
        apply(model.expert_parameters(expert), expert in chosen)


class Schedule:
    """Runs a method's phases on one module and datamodule."""

    def __init__(
        self,
        module: CTRModule,
        datamodule: MultiDomainDataModule,
        make_trainer: TrainerFactory,
        patience: int = 3,
        min_delta: float = 0.0,
        phase2_mode: str = "parallel",
        checkpoints: RunCheckpoints | None = None,
    ) -> None:
        if phase2_mode not in PHASE2_MODES:
            raise ValueError(f"method.phase2 must be one of {PHASE2_MODES}, got {phase2_mode!r}")
        self.module = module
        self.model = module.model
        self.datamodule = datamodule
        self.make_trainer = make_trainer
        self.patience = patience
        self.min_delta = min_delta
        self.phase2_mode = phase2_mode
        self.checkpoints = checkpoints
        self.last_trainer: L.Trainer | None = None

    # ------------------------------------------------------------------ public
    def run(self, method: str) -> list[PhaseReport]:
        """Run the method's phases in order; with checkpoints, skip those that already ended."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        if method == "moe_mlora":
            steps = [self.backbone_phase, self.experts_phase, self.gate_phase]
        else:
            steps = [lambda: self.joint_phase(method)]
        reports: list[PhaseReport] = []
        ended: dict | None = None  # the last phase that ended in an earlier attempt
        for index, step in enumerate(steps, start=1):
            record = self.checkpoints.finished_phase(index) if self.checkpoints else None
            if record is not None:
                reports.append(PhaseReport.from_json(record["report"]))
                ended = record
                continue
            if ended is not None:
                self._continue_after(ended)
                ended = None
            report = step()
            if self.checkpoints:
                self.checkpoints.save_phase(index, report.to_json(), self.model)
            reports.append(report)
        if ended is not None:  # every phase had ended: the run stopped before or during test
            self._continue_after(ended)
            self.model.routing = PHASE_ROUTING[method][-1]
        return reports

    def joint_phase(self, method: str) -> PhaseReport:
        self.model.routing = PHASE_ROUTING[method][0]
        self._trainable(backbone=True, experts=True, gate=False)
        return self._fit_on_all_domains(Phase(1, "joint"))

    def _continue_after(self, record: dict) -> None:
        """Load an ended phase's weights and random state, as if it had just ended here."""
        self.model.load_state_dict(record["model"])
        restore_rng(record)
        log.info("resumed after phase %s (%s)", record["report"]["index"], record["report"]["kind"])

    def backbone_phase(self) -> PhaseReport:
        self.model.routing = "off"
        self._trainable(backbone=True, experts=False, gate=False)
        return self._fit_on_all_domains(Phase(1, "backbone"))

    def experts_phase(self) -> PhaseReport:
        assignment = expert_assignment(self.model.num_experts, self.datamodule.num_domains)
        phase = Phase(2, "experts", assignment)
        self.model.routing = "expert"
        self.module.phase = phase
        start = time.perf_counter()
        if self.phase2_mode == "parallel":
            groups = [list(range(len(assignment)))]
        else:
            groups = [[expert] for expert in range(len(assignment))]
        report = PhaseReport(phase.index, phase.kind)
        records: dict[int, ExpertRecord] = {}
        train_seconds = 0.0
        for experts in groups:
            self._trainable(backbone=False, experts=experts, gate=False)
            stopper, throughput = self._fit_experts(phase, assignment, experts)
            records.update({e: stopper.records[e] for e in experts})
            report.train_samples += throughput.samples
            train_seconds += throughput.seconds
        report.train_samples_per_s = (
            report.train_samples / train_seconds if train_seconds else math.nan
        )
        report.wall_time_s = time.perf_counter() - start
        report.epochs = max(r.epochs for r in records.values())
        report.best_val_wauc = self._experts_val_wauc(assignment, records)
        report.experts = [
            {
                "expert": e,
                "domains": [self.datamodule.domain_names[d] for d in r.domains],
                "epochs": r.epochs,
                "best_epoch": r.best_epoch,
                "best_val_wauc": r.best,
            }
            for e, r in sorted(records.items())
        ]
        return report

    def gate_phase(self) -> PhaseReport:
        self.model.routing = "mixture"
        self._trainable(backbone=False, experts=False, gate=True)
        return self._fit_on_all_domains(Phase(3, "gate"))

    def test(self) -> dict:
        """Evaluate the final model once on the test split."""
        trainer = self.make_trainer(Phase(0, "test"), [], False)
        trainer.test(self.module, dataloaders=self.datamodule.test_dataloader(), verbose=False)
        return self.module.test_result

    # ---------------------------------------------------------------- internal
    def _experts_val_wauc(
        self, assignment: list[list[int]], records: dict[int, ExpertRecord]
    ) -> float:
        """The experts' best validation WAUCs averaged with weights = their validation rows."""
        rows = expert_rows(self.datamodule.processed.splits["val"], assignment)
        pairs = [(r.best, len(rows[e])) for e, r in records.items() if not math.isnan(r.best)]
        total = sum(n for _, n in pairs)
        return sum(v * n for v, n in pairs) / total if total else math.nan

    def _trainable(self, backbone: bool, experts: bool | Iterable[int], gate: bool) -> None:
        set_trainable(self.model, backbone, experts, gate)

    def _fit_on_all_domains(self, phase: Phase) -> PhaseReport:
        self.module.phase = phase
        best = BestWeights(f"{phase.prefix}/val/wauc", self.patience, self.min_delta)
        throughput = TrainThroughput()
        start = time.perf_counter()
        dm = self.datamodule
        train = dm.train_dataloader()
        callbacks, resume = self._with_epoch_checkpoints(phase, [best, throughput], train)
        trainer = self.make_trainer(phase, callbacks, False)
        trainer.fit(
            self.module,
            train_dataloaders=train,
            val_dataloaders=dm.val_dataloader(),
            ckpt_path=resume,
            weights_only=False,  # our own file: it holds random states and metric dicts
        )
        self.last_trainer = trainer
        return PhaseReport(
            index=phase.index,
            kind=phase.kind,
            epochs=best.epochs,
            best_epoch=best.best_epoch,
            best_val_wauc=best.best,
            best_val=metrics_to_json(best.best_metrics, dm.domain_names),
            wall_time_s=time.perf_counter() - start,
            train_samples=throughput.samples,
            train_seconds=throughput.seconds,
            train_wall_seconds=throughput.wall_seconds,
            train_samples_per_s=throughput.samples_per_second,
        )

    def _fit_experts(
        self, phase: Phase, assignment: list[list[int]], experts: list[int]
    ) -> tuple[ExpertEarlyStopping, TrainThroughput]:
        batches = self.datamodule.expert_train_batches(assignment, active=experts)
        stopper = ExpertEarlyStopping(batches, assignment, self.patience, self.min_delta)
        throughput = TrainThroughput()
        callbacks, resume = [stopper, throughput], None
        if self.phase2_mode == "parallel":  # sequential: a resume restarts phase 2
            callbacks, resume = self._with_epoch_checkpoints(phase, callbacks, batches)
        trainer = self.make_trainer(phase, callbacks, True)
        val = self.datamodule.expert_val_batches(assignment)
        trainer.fit(
            self.module,
            train_dataloaders=batches,
            val_dataloaders=val,
            ckpt_path=resume,
            weights_only=False,
        )
        self.last_trainer = trainer
        return stopper, throughput

    def _with_epoch_checkpoints(
        self, phase: Phase, callbacks: list[L.Callback], train_batches
    ) -> tuple[list[L.Callback], Path | None]:
        """The phase's callbacks plus per-epoch checkpoints, and the checkpoint to resume from."""
        if self.checkpoints is None:
            return callbacks, None
        saver = EpochCheckpoint(
            self.checkpoints.epoch_file(phase.index), self.checkpoints.fingerprint, train_batches
        )
        resume = self.checkpoints.resume_path(phase.index)
        if resume is not None:
            log.info("resuming phase %d (%s) from %s", phase.index, phase.kind, resume)
        return [*callbacks, saver], resume
