"""The schedule runner: executes any list of phases (:mod:`moe_mlora.training.schedules`).

Each phase gets a fresh Trainer (and an optimizer, fresh or carried on), the routing and
trainable groups its spec declares, its rows, its early stopping on the declared metric,
and ends with its best weights restored; with ``best: run`` a phase must beat the whole
run's best validation score, or the run's best weights come back. Base, MLoRA and every
MoE-MLoRA schedule are such lists; nothing here knows a method by name.

Under DDP (``trainer=ddp``) every process runs the same schedule: each phase's Trainer
wraps the module anew (so DDP sees that phase's trainable parameters) and the batches
shard themselves (:mod:`moe_mlora.data.batches`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch

from moe_mlora.data.batches import epoch_generator, expert_assignment, expert_rows
from moe_mlora.data.datamodule import MultiDomainDataModule
from moe_mlora.training.callbacks import (
    BestWeights,
    ExpertEarlyStopping,
    ExpertRecord,
    TrainThroughput,
    persistent_buffers,
)
from moe_mlora.training.checkpoints import EpochCheckpoint, RunCheckpoints, restore_rng
from moe_mlora.training.module import EVALUATION, CTRModule, Phase
from moe_mlora.training.reports import PhaseReport, metrics_to_json
from moe_mlora.training.schedules import PhaseSpec, ScheduleSpec

log = logging.getLogger("moe_mlora")

PHASE2_MODES = ("parallel", "sequential")
SPREAD_SEED = 0x5EED  # mixed with the run's seed: the noise of spread_domain_experts

# Builds a Trainer for a phase with the given callbacks; `reload` asks for the
# train loader's length to be re-read every epoch (phase 2's shrinks).
TrainerFactory = Callable[[Phase, list[L.Callback], bool], L.Trainer]


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
    chosen = set(range(model.num_experts)) if experts is True else set(experts or ())
    # the experts are stacked tensors: they train if any expert does; Adam skips the others
    apply(model.expert_parameters(), bool(chosen))
    model.frozen_experts = frozenset(set(range(model.num_experts)) - chosen)


@dataclass
class RunBest:
    """The run's best validation score so far, per metric, and the weights that scored it.

    Parameters and persistent buffers (moving statistics) are kept; pretrained tables are
    constant non-persistent buffers, possibly large, and are not copied.
    """

    score: float = math.nan
    weights: dict[str, torch.Tensor] | None = None
    metrics: dict | None = None

    def update(self, score: float, model: torch.nn.Module, metrics: dict | None) -> None:
        if math.isnan(score) or (not math.isnan(self.score) and score <= self.score):
            return
        self.score, self.metrics = score, metrics
        state = [*model.named_parameters(), *persistent_buffers(model)]
        self.weights = {n: p.detach().clone() for n, p in state}

    def restore(self, model: torch.nn.Module) -> None:
        if self.weights is None:
            return
        with torch.no_grad():
            for name, tensor in [*model.named_parameters(), *persistent_buffers(model)]:
                if name in self.weights:  # older checkpoints kept no buffers
                    tensor.copy_(self.weights[name])


class Schedule:
    """Runs a :class:`ScheduleSpec`'s phases on one module and datamodule."""

    def __init__(
        self,
        module: CTRModule,
        datamodule: MultiDomainDataModule,
        make_trainer: TrainerFactory,
        spec: ScheduleSpec | None = None,
        patience: int = 3,
        min_delta: float = 0.0,
        phase2_mode: str = "parallel",
        checkpoints: RunCheckpoints | None = None,
        seed: int = 0,
    ) -> None:
        if phase2_mode not in PHASE2_MODES:
            raise ValueError(f"method.phase2 must be one of {PHASE2_MODES}, got {phase2_mode!r}")
        self.module = module
        self.model = module.model
        self.datamodule = datamodule
        self.make_trainer = make_trainer
        self.spec = spec
        self.patience = patience
        self.min_delta = min_delta
        self.phase2_mode = phase2_mode
        self.checkpoints = checkpoints
        self.seed = seed
        self.run_best: dict[str, RunBest] = {}
        self.last_trainer: L.Trainer | None = None

    # ------------------------------------------------------------------ public
    def run(self) -> list[PhaseReport]:
        """Run the schedule's phases in order; with checkpoints, skip those that already ended."""
        if self.spec is None:
            raise ValueError("Schedule.run needs a ScheduleSpec (spec=...)")
        reports: list[PhaseReport] = []
        ended: dict | None = None  # the last phase that ended in an earlier attempt
        for index, phase in enumerate(self.spec.phases, start=1):
            record = self.checkpoints.finished_phase(index) if self.checkpoints else None
            if record is not None:
                reports.append(PhaseReport.from_json(record["report"]))
                log.info("phase %d (%s): ended in an earlier attempt, skipped", index, phase.name)
                ended = record
                continue
            if ended is not None:
                self._continue_after(ended)
                ended = None
            report = self.run_phase(index, phase)
            log.info(report.summary_line())
            if self.checkpoints:
                self.checkpoints.save_phase(index, report.to_json(), self.model, self._carried())
            reports.append(report)
        if ended is not None:  # every phase had ended: the run stopped before or during test
            self._continue_after(ended)
            self.model.routing = self.spec.phases[-1].routing
        return reports

    def run_phase(self, index: int, spec: PhaseSpec) -> PhaseReport:
        """One phase: its inits, routing and trainable groups, then its rows' training."""
        self._initialise(spec)
        self.model.routing = spec.routing
        groups = set(spec.trains)
        if spec.per_expert:
            return self._experts_phase(index, spec)
        set_trainable(self.model, "backbone" in groups, "experts" in groups, "gate" in groups)
        if spec.rows == "each_expert":
            return self._each_expert_phase(index, spec)
        return self._fit_rows(Phase(index, spec), domains=None)

    def test(self) -> dict:
        """Evaluate the final model once on the test split."""
        trainer = self.make_trainer(Phase(0, EVALUATION), [], False)
        trainer.test(self.module, dataloaders=self.datamodule.test_dataloader(), verbose=False)
        return self.module.test_result

    # -------------------------------------------------------------------- inits
    def _initialise(self, spec: PhaseSpec) -> None:
        for step in spec.init:
            if step == "spread_domain_experts":
                self._spread_domain_experts()
            elif step == "gate_own_experts":
                self.model.tower.adapter.gate.reset_to_own_experts()
            elif step == "gate_near_uniform":
                self.model.tower.adapter.gate.reset_near_uniform()

    def _spread_domain_experts(self) -> None:
        """Every expert starts as its domain's trained adapter (see LoRAExperts.spread)."""
        num_domains, num_experts = self.datamodule.num_domains, self.model.num_experts
        groups = [
            [e for e in range(num_experts) if e % num_domains == d] for d in range(num_domains)
        ]
        generator = epoch_generator(self.seed, SPREAD_SEED)
        noise = self.spec.init_noise if self.spec else 0.0
        for layer in self.model.tower.layers:
            if layer.lora is not None:
                layer.lora.spread(groups, noise, generator)

    # ------------------------------------------------------------------ phases
    def _continue_after(self, record: dict) -> None:
        """Load an ended phase's weights and random state, as if it had just ended here."""
        self.model.load_state_dict(record["model"])
        restore_rng(record)
        carried = record.get("carried") or {}
        self.run_best = {
            monitor: RunBest(**best) for monitor, best in carried.get("run_best", {}).items()
        }
        self.module.carried_optimizer = carried.get("optimizer")
        log.info("resumed after phase %s (%s)", record["report"]["index"], record["report"]["kind"])

    def _carried(self) -> dict:
        """What later phases need besides the weights: the run's best, Adam's carried state."""
        return {
            "run_best": {monitor: asdict(best) for monitor, best in self.run_best.items()},
            "optimizer": self.module.carried_optimizer,
        }

    def _experts_phase(self, index: int, spec: PhaseSpec) -> PhaseReport:
        """Experts side by side, each on its own domains with its own early stopping."""
        assignment = expert_assignment(self.model.num_experts, self.datamodule.num_domains)
        phase = Phase(index, spec, assignment)
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
            set_trainable(self.model, backbone=False, experts=experts, gate=False)
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
        report.best_score = report.best_val_wauc
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

    def _each_expert_phase(self, index: int, spec: PhaseSpec) -> PhaseReport:
        """The phase once per expert, on that expert's domains, validated on all domains.

        One report sums the experts' fits; ``experts`` lists each fit's outcome.
        """
        assignment = expert_assignment(self.model.num_experts, self.datamodule.num_domains)
        start = time.perf_counter()
        total = PhaseReport(index, spec.name, monitor=spec.monitor, kept=False)
        for expert, domains in enumerate(assignment):
            report = self._fit_rows(Phase(index, spec, assignment), domains=domains)
            names = [self.datamodule.domain_names[d] for d in domains]
            total.experts.append(
                {
                    "expert": expert,
                    "domains": names,
                    "epochs": report.epochs,
                    "kept": report.kept,
                    "reverted_epochs": report.reverted_epochs,
                    "best_score": report.best_score,
                }
            )
            total.epochs += report.epochs
            total.reverted_epochs += report.reverted_epochs
            total.train_samples += report.train_samples
            total.train_seconds += report.train_seconds
            total.train_wall_seconds += report.train_wall_seconds
            if report.kept or total.best_epoch < 0:
                total.kept = total.kept or report.kept
                total.best_epoch = total.epochs - report.epochs + report.best_epoch
                total.best_val_wauc, total.best_val = report.best_val_wauc, report.best_val
                total.best_score = report.best_score
        total.wall_time_s = time.perf_counter() - start
        if total.train_seconds:
            total.train_samples_per_s = total.train_samples / total.train_seconds
        return total

    # ---------------------------------------------------------------- internal
    def _experts_val_wauc(
        self, assignment: list[list[int]], records: dict[int, ExpertRecord]
    ) -> float:
        """The experts' best validation WAUCs averaged with weights = their validation rows."""
        rows = expert_rows(self.datamodule.processed.splits["val"], assignment)
        pairs = [(r.best, len(rows[e])) for e, r in records.items() if not math.isnan(r.best)]
        total = sum(n for _, n in pairs)
        return sum(v * n for v, n in pairs) / total if total else math.nan

    def _best_weights(self, phase: Phase) -> BestWeights:
        spec = phase.spec
        patience = spec.patience if spec.patience is not None else self.patience
        monitor = f"{phase.prefix}/val/{spec.monitor}"
        if spec.best == "phase":
            return BestWeights(monitor, patience, self.min_delta, revert=spec.revert)
        run_best = self.run_best.setdefault(spec.monitor, RunBest())
        return BestWeights(
            monitor,
            patience,
            self.min_delta,
            revert=spec.revert,
            to_beat=run_best.score,
            fallback=lambda: run_best.restore(self.model),
        )

    def _fit_rows(self, phase: Phase, domains: list[int] | None) -> PhaseReport:
        """Train on all rows (or ``domains``' rows), validate on all domains."""
        self.module.phase = phase
        spec = phase.spec
        best = self._best_weights(phase)
        throughput = TrainThroughput()
        start = time.perf_counter()
        dm = self.datamodule
        single_domain = spec.batches == "single_domain"
        if domains is None and not single_domain:
            train = dm.train_dataloader()
        else:
            train = dm.train_dataloader(domains=domains, single_domain=single_domain)
        callbacks = [best, throughput]
        resume = None
        if domains is None:  # each_expert's fits restart with the phase on a resume
            callbacks, resume = self._with_epoch_checkpoints(phase, callbacks, train)
        trainer = self.make_trainer(phase, callbacks, False)
        trainer.fit(
            self.module,
            train_dataloaders=train,
            val_dataloaders=dm.val_dataloader(),
            ckpt_path=resume,
            weights_only=True,  # tensors and plain types only: a planted file cannot run code
        )
        self.last_trainer = trainer
        if trainer.optimizers:
            self.module.keep_optimizer_state(trainer.optimizers[0])
        if best.improved:
            self.run_best.setdefault(spec.monitor, RunBest()).update(
                best.best, self.model, best.best_metrics
            )
        metrics = best.best_metrics if best.improved else best.seen_metrics
        if spec.monitor == "wauc":
            best_wauc = best.best if best.improved else best.seen_best
        else:
            best_wauc = float(metrics["wauc"]) if metrics is not None else math.nan
        return PhaseReport(
            index=phase.index,
            kind=phase.kind,
            epochs=best.epochs,
            best_epoch=best.best_epoch if best.improved else best.seen_epoch,
            best_val_wauc=best_wauc,
            best_val=metrics_to_json(metrics, dm.domain_names),
            wall_time_s=time.perf_counter() - start,
            train_samples=throughput.samples,
            train_seconds=throughput.seconds,
            train_wall_seconds=throughput.wall_seconds,
            train_samples_per_s=throughput.samples_per_second,
            monitor=spec.monitor,
            best_score=best.best if best.improved else best.seen_best,
            kept=best.improved,
            reverted_epochs=best.reverted,
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
            weights_only=True,
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
