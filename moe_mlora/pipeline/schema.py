"""The results.json schema, declared once: what a run records, read and written through it.

Writers build a :class:`RunRecord` and write :meth:`RunRecord.to_json`; readers (the
sweep's skip check, the run folder's finished check, the report) go through
:meth:`RunRecord.from_json`, which also reads files from before a key existed (``schedule``,
``hyperparameters``, ``run.debug``...): a missing section reads as empty, never as an error.
A file that is not a run's record at all raises :class:`RecordError` with the reason.
Version 1 files carry no ``schema_version``; version 2 files no ``validation`` (derived from
their phases on reading, see :func:`final_validation`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

SCHEMA_VERSION = 3
STATUSES = ("completed", "failed")
HEADLINE = ("wauc", "mean_auc", "auc", "logloss")


def final_validation(phases: list[dict[str, Any]]) -> dict[str, float] | None:
    """The validation scores of the model a run tested: the best of its last *kept* phase.

    With per-phase best weights every phase is kept and the tested model is the last
    phase's best. A phase that keeps the run's best (``best: run``) and never beat it is not
    kept: the run's best came back, so the tested model is an earlier phase's best. Phases
    recorded without ``best_val`` give their ``best_val_wauc`` alone. Model selection (which
    method or schedule a study should pick) is made on these numbers, never on the test's.
    """
    for phase in reversed(phases):
        if phase.get("kept", True) is False:
            continue
        best = phase.get("best_val")
        if isinstance(best, dict) and best.get("wauc") is not None:
            return {key: best[key] for key in HEADLINE if key in best}
        wauc = phase.get("best_val_wauc")
        return None if wauc is None else {"wauc": wauc}
    return None


class RecordError(ValueError):
    """A JSON value that is not a run's results.json; says what is wrong with it."""


@dataclass
class RunInfo:
    """``run``: which run this is, read from its config alone."""

    name: str | None = None
    data: str | None = None
    model: str | None = None
    method: str | None = None
    schedule: str | None = None
    experts: int | None = None
    experts_per_domain: int | None = None
    seed: int | None = None
    overrides: list[str] = field(default_factory=list)
    config_fingerprint: str | None = None
    debug: str | None = None
    output_dir: str | None = None

    @classmethod
    def from_json(cls, values: dict) -> RunInfo:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class RunRecord:
    """A run's results.json. ``test`` holds the headline metrics (:data:`HEADLINE`), the
    per-domain table and, for MoE runs, the gate's weights and diagnostics; ``validation``
    the tested model's validation scores (:func:`final_validation`)."""

    status: str
    run: RunInfo
    schedule: dict[str, Any] | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    flops: dict[str, Any] = field(default_factory=dict)
    phases: list[dict[str, Any]] = field(default_factory=list)
    validation: dict[str, Any] | None = None
    test: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    wall_time_s: float | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    def to_json(self) -> dict[str, Any]:
        """The JSON object, leaving out the sections a record does not have (a failed
        run has no test, a completed one no error)."""
        values = asdict(self)
        return {k: v for k, v in values.items() if v is not None or k in ("status", "run")}

    @classmethod
    def from_json(cls, values: Any) -> RunRecord:
        """A record from a parsed results.json, of this version or an older one."""
        if not isinstance(values, dict) or not isinstance(values.get("run"), dict):
            raise RecordError("not a run's results.json (it has no 'run' section)")
        status = values.get("status")
        if status not in STATUSES:
            raise RecordError(f"unknown status {status!r} (expected one of {list(STATUSES)})")
        test = values.get("test")
        if status == "completed":
            if not isinstance(test, dict):
                raise RecordError("says the run completed but has no 'test' section")
            missing = [key for key in HEADLINE if key not in test]
            if missing:
                raise RecordError(f"its 'test' section lacks {', '.join(missing)}")
        known = {f.name for f in fields(cls)} - {"run", "schema_version"}
        record = cls(
            run=RunInfo.from_json(values["run"]),
            schema_version=int(values.get("schema_version", 1)),
            **{k: v for k, v in values.items() if k in known and v is not None},
        )
        if record.validation is None and record.completed:
            record.validation = final_validation(record.phases)
        return record
