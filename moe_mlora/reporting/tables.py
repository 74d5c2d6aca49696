"""The report's tables: runs grouped by (data, model, method, experts), aggregated with polars.

Every frame has a declared schema, so an empty sweep still gives tables with the right columns.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import polars as pl

from moe_mlora.reporting.plots import method_rank
from moe_mlora.sweep import PRESENTATION_KEYS

KEYS = ["data", "model", "method", "experts"]  # a group: its runs differ by seed only
METRICS = ["wauc", "mean_auc", "auc", "logloss"]
OVERHEADS = ["adapter_overhead", "adapter_overhead_pct", "flops_overhead_pct"]
NAMES = {"data": pl.String, "model": pl.String, "method": pl.String, "experts": pl.Int64}
RUN_SCHEMA = {
    **NAMES,
    **dict.fromkeys(METRICS, pl.Float64),
    **dict.fromkeys(OVERHEADS, pl.Float64),
    "adapter_overhead": pl.Int64,
    "wall_time_s": pl.Float64,
    "seed": pl.Int64,
    "val_wauc": pl.Float64,
}
DOMAIN_SCHEMA = {
    **NAMES,
    "domain": pl.String,
    "position": pl.Int64,
    "auc": pl.Float64,
    "samples": pl.Int64,
}
GATE_SCHEMA = {
    **NAMES,
    "domain": pl.String,
    "position": pl.Int64,
    "expert": pl.Int64,
    "weight": pl.Float64,
}
DIAGNOSTIC_SCHEMA = {
    **NAMES,
    "domain": pl.String,
    "position": pl.Int64,
    "own_weight": pl.Float64,
    "entropy": pl.Float64,
}
SUMMARY_COLUMNS = [
    *KEYS,
    "n",
    "wauc_mean",
    "wauc_std",
    "val_wauc",
    "validation_choice",
    *METRICS[1:],
    "delta_wauc_vs_base",
    "delta_wauc_vs_mlora",
    "delta_wauc_vs_mlora_std",
    "paired_seeds",
    *OVERHEADS,
    "wall_time_s",
    "max_epochs",
]


def method_label(run: dict) -> str | None:
    """The method as the report names it: ``moe_mlora/warm`` when the schedule is not the
    method's own one-phase schedule; plain ``moe_mlora`` for runs recorded before schedules."""
    method, schedule = run.get("method"), run.get("schedule")
    return method if schedule in (None, method) else f"{method}/{schedule}"


def group_keys(run: dict) -> dict:
    """A run's group: (data, model, method label, experts)."""
    return {**{key: run.get(key) for key in KEYS}, "method": method_label(run)}


def runs_frame(runs: Iterable[dict]) -> pl.DataFrame:
    """One row per completed run, NaN read as missing so that means skip it."""
    rows = [_run_row(record) for record in completed(runs)]
    return _frame(rows, RUN_SCHEMA)


def _run_row(record: dict) -> dict:
    run, test = record["run"], record["test"]
    parameters, flops = record.get("parameters") or {}, record.get("flops") or {}
    return {
        **group_keys(run),
        **{metric: test.get(metric) for metric in METRICS},
        "adapter_overhead": parameters.get("adapter_overhead"),
        "adapter_overhead_pct": parameters.get("adapter_overhead_pct"),
        "flops_overhead_pct": flops.get("overhead_pct"),
        "wall_time_s": record.get("wall_time_s"),
        "seed": run.get("seed"),
        "val_wauc": (record.get("validation") or {}).get("wauc"),
    }


def summarize(runs: Iterable[dict]) -> pl.DataFrame:
    """One row per (data, model, method, experts) group over seeds: the report's main table.

    delta_wauc_vs_base compares WAUC means with the base group of the same (data, model),
    which is how the paper reports gains; NaN where that sweep has no base runs.
    """
    groups = (
        runs_frame(runs)
        .group_by(KEYS)
        .agg(
            pl.len().alias("n"),
            pl.col("wauc").mean().alias("wauc_mean"),
            pl.col("wauc").std(ddof=1).alias("wauc_std"),
            *(pl.col(metric).mean() for metric in METRICS[1:]),
            pl.col("adapter_overhead").mean().round().cast(pl.Int64),
            *(pl.col(column).mean() for column in OVERHEADS[1:]),
            pl.col("wall_time_s").mean(),
            pl.col("val_wauc").mean(),
        )
    )
    base = (
        groups.filter(pl.col("method") == "base")
        .group_by("data", "model")
        .agg(pl.col("wauc_mean").mean().alias("base_wauc"))
    )
    delta = (pl.col("wauc_mean") - pl.col("base_wauc")).alias("delta_wauc_vs_base")
    groups = groups.join(base, on=["data", "model"], how="left").with_columns(delta)
    groups = groups.join(paired_vs_mlora(runs), on=KEYS, how="left", nulls_equal=True)
    groups = groups.join(epoch_caps(runs), on=KEYS, how="left", nulls_equal=True)
    groups = groups.with_columns(validation_choice(groups))
    return _nan_for_missing(_sort_groups(groups).select(SUMMARY_COLUMNS))


def validation_choice(groups: pl.DataFrame) -> pl.Expr:
    """True for the group of each (data, model) with the highest mean validation WAUC: the
    method (schedule, expert count) that model selection on validation data would pick,
    whatever the test says. False elsewhere, and where no group has validation scores."""
    best = pl.col("val_wauc").max().over("data", "model")
    return (pl.col("val_wauc") == best).fill_null(False).alias("validation_choice")


def paired_vs_mlora(runs: Iterable[dict]) -> pl.DataFrame:
    """Per group: mean and sample std over seeds of (run's WAUC - MLoRA's WAUC, same seed).

    Runs of one (data, model, seed) share the split and batch order, so the paired
    difference removes the seed's own luck from the comparison; ``paired_seeds`` counts the
    seeds that have both.
    """
    frame = runs_frame(runs)
    mlora = frame.filter(pl.col("method") == "mlora").group_by("data", "model", "seed")
    mlora = mlora.agg(pl.col("wauc").mean().alias("mlora_wauc"))
    paired = frame.join(mlora, on=["data", "model", "seed"], how="inner")
    difference = pl.col("wauc") - pl.col("mlora_wauc")
    return paired.group_by(KEYS).agg(
        difference.mean().alias("delta_wauc_vs_mlora"),
        difference.std(ddof=1).alias("delta_wauc_vs_mlora_std"),
        pl.len().alias("paired_seeds"),
    )


def domain_summary(runs: Iterable[dict]) -> pl.DataFrame:
    """Per-domain test AUC per group (long format), domains in their results.json order.

    n counts the runs where the domain's AUC is defined: a single-class domain (NaN AUC) in
    one seed leaves the mean over the other seeds intact.
    """
    rows = [row for record in completed(runs) for row in _domain_rows(record)]
    frame = _frame(rows, DOMAIN_SCHEMA)
    groups = frame.group_by([*KEYS, "domain"]).agg(
        pl.col("auc").count().alias("n"),
        pl.col("auc").mean().alias("auc_mean"),
        pl.col("auc").std(ddof=1).alias("auc_std"),
        pl.col("samples").mean().round().cast(pl.Int64).alias("test_samples"),
        pl.col("position").min(),
    )
    return _nan_for_missing(_sort_groups(groups, "position").drop("position"))


def _domain_rows(record: dict) -> Iterator[dict]:
    keys = group_keys(record["run"])
    per_domain = record["test"].get("per_domain") or {}
    for position, (domain, values) in enumerate(per_domain.items()):
        auc, samples = values.get("auc"), values.get("samples")
        yield {**keys, "domain": domain, "position": position, "auc": auc, "samples": samples}


def gate_summary(runs: Iterable[dict]) -> pl.DataFrame:
    """Mean test gate weight per group, domain and expert over seeds: the heatmaps' data."""
    rows = [row for record in completed(runs) for row in _gate_rows(record)]
    frame = _frame(rows, GATE_SCHEMA).group_by([*KEYS, "domain", "expert"])
    means = frame.agg(pl.col("weight").mean(), pl.col("position").min())
    return _sort_groups(means, "position", "expert")


def _gate_rows(record: dict) -> Iterator[dict]:
    keys = group_keys(record["run"])
    gates = record["test"].get("gate_weights") or {}
    for position, (domain, weights) in enumerate(gates.items()):
        names = {**keys, "experts": keys["experts"] or len(weights), "domain": domain}
        for expert, weight in enumerate(weights):
            yield {**names, "position": position, "expert": expert, "weight": weight}


def gate_diagnostics_summary(runs: Iterable[dict]) -> pl.DataFrame:
    """Per group and domain, over seeds: the test gate weight on the domain's own experts and
    the routing entropy (results.json's ``test.gate_diagnostics``; older runs have none)."""
    rows = [row for record in completed(runs) for row in _diagnostic_rows(record)]
    frame = _frame(rows, DIAGNOSTIC_SCHEMA).group_by([*KEYS, "domain"])
    means = frame.agg(
        pl.col("own_weight").mean(), pl.col("entropy").mean(), pl.col("position").min()
    )
    return _sort_groups(means, "position").drop("position")


def _diagnostic_rows(record: dict) -> Iterator[dict]:
    keys = group_keys(record["run"])
    diagnostics = (record["test"].get("gate_diagnostics") or {}).get("per_domain") or {}
    for position, (domain, values) in enumerate(diagnostics.items()):
        yield {**keys, "domain": domain, "position": position, **values}


def _frame(rows: list[dict], schema: dict) -> pl.DataFrame:
    frame = pl.DataFrame(rows, schema=schema, strict=False)
    return frame.with_columns(pl.col(pl.Float64).fill_nan(None))


def _sort_groups(frame: pl.DataFrame, *then: str) -> pl.DataFrame:
    order = [pl.col("data"), pl.col("model"), method_rank(), pl.col("method"), pl.col("experts")]
    return frame.sort([*order, *then], nulls_last=False, maintain_order=True)


def _nan_for_missing(frame: pl.DataFrame) -> pl.DataFrame:
    """Missing floats as NaN (one spelling in the CSVs); missing integers stay empty."""
    return frame.with_columns(pl.col(pl.Float64).fill_null(math.nan))


def mixed_overrides(runs: Iterable[dict]) -> list[str]:
    """Groups whose runs differ in more than the seed (e.g. a swept learning rate).

    The report groups by (data, model, method, experts) only; such a group would silently
    average different settings, so the report warns about it.
    """
    seen: dict[tuple, set[tuple[str, ...]]] = {}
    for record in completed(runs):
        run = record["run"]
        overrides = tuple(sorted(o for o in run.get("overrides") or [] if not _same_result(o)))
        seen.setdefault(tuple(group_keys(run).values()), set()).add(overrides)
    return [
        f"{'/'.join(map(str, key))}: {' vs '.join(' '.join(o) or '(none)' for o in sorted(sets))}"
        for key, sets in seen.items()
        if len(sets) > 1
    ]


# Keys whose values do not change a run's result (how it is shown, where data and caches
# live), besides the seed a group averages over.
SAME_RESULT_KEYS = (
    "seed",
    *PRESENTATION_KEYS,
    "data.root",
    "data.path",
    "trainer.enable_progress_bar",
)


def _same_result(override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return any(key == k or key.startswith(f"{k}.") for k in SAME_RESULT_KEYS)


def max_epochs(record: dict) -> int | None:
    """The run's epoch cap per phase: recorded in hyperparameters, else from its overrides."""
    recorded = (record.get("hyperparameters") or {}).get("max_epochs")
    if recorded is not None:
        return int(recorded)
    for override in record["run"].get("overrides") or []:
        key, _, value = override.lstrip("+~").partition("=")
        if key == "trainer.max_epochs" and value.lstrip("-").isdigit():
            return int(value)
    return None


def epoch_caps(runs: Iterable[dict]) -> pl.DataFrame:
    """Per group, its runs' epoch caps: ``50``, or ``10 / 50`` when a group mixes caps.

    A run whose results.json records no cap (written before the cap was recorded, with no
    ``trainer.max_epochs`` override) is unknown, not different: it makes no group mixed,
    and a group of such runs alone shows ``?``.
    """
    rows = [{**group_keys(record["run"]), "cap": max_epochs(record)} for record in completed(runs)]
    frame = _frame(rows, {**NAMES, "cap": pl.Int64})
    caps = frame.group_by(KEYS).agg(
        pl.col("cap").drop_nulls().unique().sort().cast(pl.String).str.join(" / ")
    )
    return caps.select(
        *KEYS, pl.when(pl.col("cap") == "").then(pl.lit("?")).otherwise("cap").alias("max_epochs")
    )


def completed(runs: Iterable[dict]) -> list[dict]:
    """The runs that finished and were tested: the only ones the tables aggregate."""
    return [run for run in runs if run.get("status") == "completed"]


def failed(runs: Iterable[dict]) -> list[dict]:
    """The runs that did not complete (crashed sweep jobs), listed in the report's last section."""
    return [run for run in runs if run.get("status") != "completed"]
