"""Training schedules as data: a method is a list of phases, and one runner executes any list.

A :class:`PhaseSpec` says everything a phase does, so that base, MLoRA, the paper's
three-phase MoE-MLoRA, the authors' code as it really runs and our own variant are all
entries of one mechanism (``conf/method/schedule/*.yaml``), not branches in the code:

=============== ================================================================================
key             meaning
=============== ================================================================================
``name``        the phase's name in logs and results.json (``backbone``, ``experts``...)
``routing``     how the tower's adapters are mixed: ``off``, ``domain`` (each row uses its
                domain's own expert), ``expert`` (phase-2 routing: the row's expert tag) or
                ``mixture`` (the gate)
``trains``      the parameter groups that train: any of ``backbone``, ``experts``, ``gate``;
                the others are frozen and stay bit-identical
``rows``        ``all`` (every domain), ``expert_domains`` (each expert only on its own
                domains, all experts in one pass, each with its own early stopping) or
                ``each_expert`` (the whole phase repeated for one expert's domains at a
                time, in expert order, validated on all domains)
``batches``     ``mixed`` (rows of all domains in a batch) or ``single_domain`` (every batch
                from one domain, the domains in a new random order each epoch)
``init``        what happens to the weights before the phase, in order:
                ``spread_domain_experts`` (every expert gets a copy of its domain's trained
                adapter; copies of one domain differ by zero-sum noise, so their average is
                the adapter), ``gate_own_experts`` (the anchored gate starts at the own-expert
                routing, so the mixture model equals the previous one exactly) and
                ``gate_near_uniform`` (the reference's random gate: every weight about 1/E)
``lr``          the learning rate (``null``: ``optimizer.lr``)
``optimizer``   ``fresh`` (a new Adam) or ``carry`` (Adam's state continues from the last
                phase that trained the same parameters, as the reference's single Adam does)
``monitor``     the early-stopping metric: ``wauc`` or ``mean_auc`` (unweighted mean of the
                domains' validation AUCs, the reference's criterion)
``best``        ``phase`` (the phase keeps its own best epoch) or ``run`` (the phase must beat
                the best validation score of the whole run so far; if it never does, the run's
                best weights come back)
``revert``      after an epoch that does not improve the monitored score, restore the best
                weights (the reference's rule), instead of carrying on from the last epoch
``patience``    epochs without improvement before the phase stops (``null``:
                ``callbacks.early_stopping.patience``)
=============== ================================================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

ROUTINGS = ("off", "domain", "expert", "mixture")
GROUPS = ("backbone", "experts", "gate")
ROWS = ("all", "expert_domains", "each_expert")
BATCHES = ("mixed", "single_domain")
INITS = ("spread_domain_experts", "gate_own_experts", "gate_near_uniform")
OPTIMIZER_STATES = ("fresh", "carry")
MONITORS = ("wauc", "mean_auc")
BEST_SCOPES = ("phase", "run")


class ScheduleError(ValueError):
    """A schedule that cannot run; the message names the phase, the key and the fix."""


def _check_choice(where: str, key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ScheduleError(f"{where}: {key} must be one of {list(choices)}, got {value!r}")


@dataclass(frozen=True)
class PhaseSpec:
    """One phase of a schedule (see the module docstring for every key)."""

    name: str
    routing: str
    trains: tuple[str, ...]
    rows: str = "all"
    batches: str = "mixed"
    init: tuple[str, ...] = ()
    lr: float | None = None
    optimizer: str = "fresh"
    monitor: str = "wauc"
    best: str = "phase"
    revert: bool = False
    patience: int | None = None

    def __post_init__(self) -> None:
        where = f"phase {self.name!r}"
        object.__setattr__(self, "trains", tuple(self.trains))
        object.__setattr__(self, "init", tuple(self.init))
        _check_choice(where, "routing", self.routing, ROUTINGS)
        _check_choice(where, "rows", self.rows, ROWS)
        _check_choice(where, "batches", self.batches, BATCHES)
        _check_choice(where, "optimizer", self.optimizer, OPTIMIZER_STATES)
        _check_choice(where, "monitor", self.monitor, MONITORS)
        _check_choice(where, "best", self.best, BEST_SCOPES)
        for group in self.trains:
            _check_choice(where, "trains", group, GROUPS)
        if not self.trains:
            raise ScheduleError(f"{where}: trains is empty; list at least one of {list(GROUPS)}")
        for step in self.init:
            _check_choice(where, "init", step, INITS)
        if self.lr is not None and not (isinstance(self.lr, int | float) and self.lr > 0):
            raise ScheduleError(f"{where}: lr must be a number > 0 or null, got {self.lr!r}")
        if self.patience is not None and (isinstance(self.patience, bool) or self.patience < 1):
            raise ScheduleError(f"{where}: patience must be >= 1 or null, got {self.patience!r}")
        if self.rows == "expert_domains":
            self._check_expert_domains(where)
        if self.routing == "off" and self.trains != ("backbone",):
            raise ScheduleError(
                f"{where}: routing 'off' uses no adapter, so only the backbone can train; "
                "set trains: [backbone] or another routing"
            )

    def _check_expert_domains(self, where: str) -> None:
        """rows: expert_domains trains experts side by side, each scored on its own rows."""
        if self.routing != "expert" or self.trains != ("experts",):
            raise ScheduleError(
                f"{where}: rows 'expert_domains' trains each expert alone on its domains; it "
                "needs routing: expert and trains: [experts] (use rows: each_expert to train "
                "more on one expert's domains at a time)"
            )
        if self.best == "run" or self.revert or self.batches != "mixed":
            raise ScheduleError(
                f"{where}: rows 'expert_domains' scores each expert on its own domains, which "
                "no run-wide score compares with; it needs best: phase, revert: false and "
                "batches: mixed"
            )

    @property
    def per_expert(self) -> bool:
        """Experts side by side, each with its own loss mean, validation and early stopping."""
        return self.rows == "expert_domains"

    @property
    def trains_gate(self) -> bool:
        return "gate" in self.trains

    def to_json(self) -> dict:
        return {**asdict(self), "trains": list(self.trains), "init": list(self.init)}

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any], position: int) -> PhaseSpec:
        known = [f.name for f in fields(cls)]
        name = spec.get("name", f"#{position}")
        unknown = sorted(str(k) for k in spec if k not in known)
        if unknown:
            raise ScheduleError(
                f"phase {name!r}: unknown key(s) {', '.join(unknown)}; a phase takes "
                f"{', '.join(known)}"
            )
        missing = [k for k in ("name", "routing", "trains") if k not in spec]
        if missing:
            raise ScheduleError(f"phase {name!r}: missing key(s) {', '.join(missing)}")
        values = dict(spec)
        for key in ("trains", "init"):
            if isinstance(values.get(key), str):
                values[key] = [values[key]]
        return cls(**values)


@dataclass(frozen=True)
class ScheduleSpec:
    """A named list of phases; the final model is the last phase's (or the run's best) weights.

    In YAML a schedule-level ``batches`` sets the batches of every phase that does not
    set its own (``method.schedule.batches=single_domain`` on the command line).
    ``adapters`` lists the adapter kinds the schedule can drive (its routings and inits need
    them): a schedule with a gate phase cannot run on MLoRA, for example.
    """

    name: str
    phases: tuple[PhaseSpec, ...]
    description: str = ""
    adapters: tuple[str, ...] = field(default=("none", "mlora", "moe"))
    init_noise: float = 0.0  # scale of spread_domain_experts' zero-sum noise

    def __post_init__(self) -> None:
        if not self.phases:
            raise ScheduleError(f"schedule {self.name!r} has no phases")

    def check_adapter(self, kind: str, method: str) -> None:
        """Refuse a schedule on an adapter whose routings or groups it needs but lacks."""
        if kind not in self.adapters:
            raise ScheduleError(
                f"method={method} (adapter {kind!r}) cannot run schedule {self.name!r}, which "
                f"is for adapter kinds {list(self.adapters)}; pick another method/schedule"
            )
        needs_gate = any(
            p.routing == "mixture" or p.trains_gate or "gate_own_experts" in p.init
            for p in self.phases
        )
        if needs_gate and kind != "moe":
            raise ScheduleError(
                f"schedule {self.name!r} uses a gate, which method={method} (adapter {kind!r}) "
                "does not have; use method=moe_mlora"
            )
        needs_experts = any(p.routing != "off" or "experts" in p.trains for p in self.phases)
        if needs_experts and kind == "none":
            raise ScheduleError(
                f"schedule {self.name!r} trains adapters, which method={method} has none; "
                "use method=mlora or method=moe_mlora"
            )

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "init_noise": self.init_noise,
            "phases": [phase.to_json() for phase in self.phases],
        }

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any]) -> ScheduleSpec:
        """A schedule from its YAML block (``method.schedule``)."""
        known = {"name", "description", "phases", "adapters", "init_noise", "batches"}
        unknown = sorted(str(k) for k in spec if k not in known)
        if unknown:
            raise ScheduleError(
                f"method.schedule: unknown key(s) {', '.join(unknown)}; a schedule takes "
                f"{', '.join(sorted(known))}"
            )
        name = str(spec.get("name", "custom"))
        phases = spec.get("phases") or []
        if not isinstance(phases, Sequence) or isinstance(phases, str):
            raise ScheduleError(f"schedule {name!r}: phases must be a list of phase blocks")
        batches = spec.get("batches")  # the default of phases that do not say
        if batches is not None:
            _check_choice(f"schedule {name!r}", "batches", batches, BATCHES)
            phases = [{"batches": batches, **phase} for phase in phases]
        adapters = spec.get("adapters", ("none", "mlora", "moe"))
        noise = float(spec.get("init_noise", 0.0))
        if noise < 0:
            raise ScheduleError(f"schedule {name!r}: init_noise must be >= 0, got {noise}")
        return cls(
            name=name,
            phases=tuple(PhaseSpec.from_mapping(p, i + 1) for i, p in enumerate(phases)),
            description=str(spec.get("description", "")),
            adapters=tuple(adapters),
            init_noise=noise,
        )


def joint_schedule(routing: str) -> ScheduleSpec:
    """One phase training everything the adapter has, on all domains: base and MLoRA."""
    trains = ("backbone",) if routing == "off" else ("backbone", "experts")
    return ScheduleSpec("joint", (PhaseSpec("joint", routing, trains),))


def schedule_files() -> dict[str, Path]:
    """The built-in schedules: ``conf/method/schedule/<name>.yaml`` by name."""
    from moe_mlora.config import CONF_DIR

    return {path.stem: path for path in sorted((CONF_DIR / "method" / "schedule").glob("*.yaml"))}


def load_schedule(name: str) -> ScheduleSpec:
    """A built-in schedule by name, read from its YAML (for tests, benchmarks and notebooks)."""
    from omegaconf import OmegaConf

    files = schedule_files()
    if name not in files:
        raise ScheduleError(f"no schedule {name!r}; the built-in ones are {sorted(files)}")
    return ScheduleSpec.from_mapping(OmegaConf.to_container(OmegaConf.load(files[name])))
