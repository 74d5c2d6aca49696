"""The results.json schema, declared once: what a run records, read and written through it.

Writers build a :class:`RunRecord` and write :meth:`RunRecord.to_json`; readers (the
sweep's skip check, the run folder's finished check, the report) go through
:meth:`RunRecord.from_json`, which also reads files from before a key existed (``schedule``,
``hyperparameters``, ``run.debug``...): a missing section reads as empty, never as an error.
A file that is not a run's record at all raises :class:`RecordError` with the reason.
Version 1 files carry no ``schema_version``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

SCHEMA_VERSION = 2
STATUSES = ("completed", "failed")
HEADLINE = ("wauc", "mean_auc", "auc", "logloss")


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
    per-domain table and, for MoE runs, the gate's weights and diagnostics."""

    status: str
    run: RunInfo
    schedule: dict[str, Any] | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    flops: dict[str, Any] = field(default_factory=dict)
    phases: list[dict[str, Any]] = field(default_factory=list)
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
        return cls(
            run=RunInfo.from_json(values["run"]),
            schema_version=int(values.get("schema_version", 1)),
            **{k: v for k, v in values.items() if k in known and v is not None},
        )
