"""Tables and plots from many training runs (a Hydra sweep folder, or any folder of runs).

Every run folder holds a results.json (completed, or failed when a sweep job crashed). The
report finds them under each DIR, groups the completed runs by (data, model, method, experts)
over seeds and writes into OUT (default: <first DIR>/report):

  report.csv          one row per group: WAUC mean/std, mean domain AUC, AUC, log loss,
                      delta WAUC vs base, adapter overhead, FLOPs overhead, wall time
  report_domains.csv  per-domain test AUC per group (long format)
  report.md           the tables, the plots and the failed runs, for reading
  wauc_vs_experts_<data>.png, domain_auc_<data>.png, gate_weights_<data>_<model>_e<N>.png

Means ignore NaN (a domain whose test rows are single-class has no AUC); in report_domains.csv
n counts the runs that had an AUC. Standard deviations are sample ones (ddof=1): NaN for n=1.

examples:
  python -m moe_mlora.report multirun/2026-11-24/10-00-00
  python -m moe_mlora.report multirun/2026-11-24/* outputs --out reports/nov24
  python -m moe_mlora.report multirun/2026-11-24/10-00-00 --wandb           # offline W&B run
  python -m moe_mlora.report multirun/2026-11-24/10-00-00 --wandb online --wandb-project x
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from moe_mlora.pipeline.schema import RecordError, RunRecord
from moe_mlora.reporting.plots import group_label, method_rank, write_plots
from moe_mlora.sweep import PRESENTATION_KEYS, sweep_label

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
    *METRICS[1:],
    "delta_wauc_vs_base",
    "delta_wauc_vs_mlora",
    "delta_wauc_vs_mlora_std",
    "paired_seeds",
    *OVERHEADS,
    "wall_time_s",
    "max_epochs",
]
NO_VALUE = "—"


class ReportError(Exception):
    """A problem with the user's input: reported in one line with exit code 2, no traceback."""


# ------------------------------------------------------------------ finding and loading runs
def find_results(dirs: Iterable[Path | str], exclude: Path | str | None = None) -> list[Path]:
    """Every results.json under the DIRs, once each (DIRs may overlap), in a stable order.

    ``exclude`` is the report's own output folder, so a report written inside a sweep folder
    never reads itself back.
    """
    skip = Path(exclude).resolve() if exclude is not None else None
    found: set[Path] = set()
    for folder in map(Path, dirs):
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise ReportError(f"{folder} {what}")
        for path in folder.rglob("results.json"):
            resolved = path.resolve()
            if skip is None or not resolved.is_relative_to(skip):
                found.add(resolved)
    return sorted(found)


def load_runs(paths: Iterable[Path], skipped: list[str] | None = None) -> list[dict]:
    """The parsed results.json files, each with its file under "path" (to name failed runs).

    A file that is not a run's record (truncated, foreign JSON), or a debug run's, is left
    out and described in ``skipped`` (when given): one bad file never stops a report.
    """
    runs = []
    for path in paths:
        problem = _unusable(Path(path))
        if isinstance(problem, str):
            if skipped is not None:
                skipped.append(f"{path}: {problem}")
            continue
        runs.append({**problem, "path": str(path)})
    return runs


def _unusable(path: Path) -> dict | str:
    """The record of ``path`` (read through :class:`RunRecord`, so older files get today's
    keys), or why the report cannot use it."""
    try:
        record = RunRecord.from_json(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        return f"not valid JSON, a truncated or foreign file ({type(error).__name__})"
    except RecordError as error:
        return str(error)
    if record.run.debug:
        return f"a debug run (debug={record.run.debug}), never reported"
    return record.to_json()


def completed(runs: Iterable[dict]) -> list[dict]:
    """The runs that finished and were tested: the only ones the tables aggregate."""
    return [run for run in runs if run.get("status") == "completed"]


def failed(runs: Iterable[dict]) -> list[dict]:
    """The runs that did not complete (crashed sweep jobs), listed in the report's last section."""
    return [run for run in runs if run.get("status") != "completed"]


# ------------------------------------------------------------------ aggregation (polars)
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
    return _nan_for_missing(_sort_groups(groups).select(SUMMARY_COLUMNS))


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
    """Per group, its runs' epoch caps: ``50``, or ``10 / 50`` when a group mixes caps."""
    rows = [{**group_keys(record["run"]), "cap": max_epochs(record)} for record in completed(runs)]
    frame = _frame(rows, {**NAMES, "cap": pl.Int64})
    return frame.group_by(KEYS).agg(
        pl.col("cap")
        .unique()
        .sort()
        .cast(pl.String)
        .fill_null("?")
        .str.join(" / ")
        .alias("max_epochs")
    )


# ------------------------------------------------------------------ formatting
def _number(value: float | None, digits: int = 4, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NO_VALUE
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _percent(value: float | None, sign: bool = False) -> str:
    text = _number(value, 1, sign)
    return text if text == NO_VALUE else f"{text}%"


def _group_cells(row: dict) -> dict[str, str]:
    """A summary row as display strings, shared by the markdown and the printed table."""
    wauc = _number(row["wauc_mean"])
    if not math.isnan(row["wauc_std"]):
        wauc += f" ± {row['wauc_std']:.4f}"
    overhead = NO_VALUE if row["adapter_overhead"] is None else f"{row['adapter_overhead']:,}"
    wall = _number(row["wall_time_s"], 1)
    return {
        "data": row["data"],
        "model": row["model"],
        "method": row["method"],
        "experts": NO_VALUE if row["experts"] is None else str(row["experts"]),
        "WAUC": f"{wauc} ({row['n']})",
        "Δ WAUC vs base": _number(row["delta_wauc_vs_base"], sign=True),
        "Δ WAUC vs MLoRA (paired)": _paired(row),
        "mean domain AUC": _number(row["mean_auc"]),
        "AUC": _number(row["auc"]),
        "log loss": _number(row["logloss"]),
        "adapter params": overhead,
        "% of backbone": _percent(row["adapter_overhead_pct"]),
        "FLOPs overhead": _percent(row["flops_overhead_pct"], sign=True),
        "wall time/run": wall if wall == NO_VALUE else f"{wall}s",
        "max epochs": _epochs_cell(row.get("max_epochs")),
    }


def _epochs_cell(caps: str | None) -> str:
    """``50``; ``10 / 50 (mixed!)`` when the group averages runs of different caps."""
    if not caps:
        return NO_VALUE
    return f"{caps} (mixed!)" if " / " in caps else caps


def _paired(row: dict) -> str:
    """``+0.0016 ± 0.0004 (3)``: mean ± std of the per-seed differences, and their count."""
    text = _number(row["delta_wauc_vs_mlora"], sign=True)
    if text == NO_VALUE or row["method"] == "mlora":
        return NO_VALUE
    if not math.isnan(row["delta_wauc_vs_mlora_std"]):
        text += f" ± {row['delta_wauc_vs_mlora_std']:.4f}"
    return f"{text} ({row['paired_seeds']})"


def _markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = [_markdown_row(headers), "|" + "---|" * len(headers)]
    lines += [_markdown_row(row) for row in rows]
    return "\n".join(lines)


def _markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def _text_table(headers: Sequence[str], rows: list[Sequence[str]]) -> str:
    lines = [headers, *rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(*lines, strict=True)]
    return "\n".join(
        "  ".join(f"{cell!s:<{width}}" for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


# ------------------------------------------------------------------ report.md
GROUP_HEADERS = [
    "model",
    "method",
    "experts",
    "WAUC",
    "Δ WAUC vs base",
    "Δ WAUC vs MLoRA (paired)",
    "mean domain AUC",
    "AUC",
    "log loss",
    "adapter params",
    "% of backbone",
    "FLOPs overhead",
    "wall time/run",
    "max epochs",
]
PRINTED_HEADERS = [
    "data",
    "model",
    "method",
    "experts",
    "WAUC",
    "Δ WAUC vs base",
    "% of backbone",
    "wall time/run",
]


def markdown_report(
    dirs: Sequence[Path | str],
    runs: list[dict],
    summary: pl.DataFrame,
    domains: pl.DataFrame,
    plots: dict[str, list[Path]],
    out: Path,
    diagnostics: pl.DataFrame | None = None,
    skipped: Sequence[str] = (),
) -> str:
    """The report for reading: per data the groups, per-domain AUCs, gate diagnostics and
    plots; failed runs; the files it skipped."""
    done, crashed = completed(runs), failed(runs)
    sources = ", ".join(f"`{folder}`" for folder in dirs)
    parts = [
        "# MoE-MLoRA report",
        f"{len(runs)} runs ({len(done)} completed, {len(crashed)} failed) from {sources}.",
        "Groups are (data, model, method, experts) over seeds. WAUC: mean ± sample std (runs); "
        "Δ WAUC vs base: against the base group of the same data and model; Δ WAUC vs MLoRA "
        "(paired): mean ± std over seeds of the difference with the MLoRA run of the same "
        "data, model and seed (number of seeds paired); means skip NaN; "
        f"{NO_VALUE}: no value.",
    ]
    parts += [f"> warning: group {line}" for line in mixed_overrides(runs)]
    parts += [
        f"> warning: group {row['data']}/{row['model']}/{row['method']}/{row['experts']} "
        f"averages runs with different trainer.max_epochs ({row['max_epochs']})"
        for row in summary.iter_rows(named=True)
        if " / " in (row["max_epochs"] or "")
    ]
    if diagnostics is None:
        diagnostics = gate_diagnostics_summary(runs)
    for data in summary["data"].unique(maintain_order=True).to_list():
        parts += _data_section(data, summary, domains, plots.get(data, []), out)
        parts += _diagnostics_section(diagnostics.filter(pl.col("data") == data))
    parts += ["## Failed runs", _failed_table(crashed, dirs)]
    if skipped:
        parts += ["## Skipped files", "\n".join(f"- {line}" for line in skipped)]
    return "\n\n".join(parts) + "\n"


def _data_section(
    data: str, summary: pl.DataFrame, domains: pl.DataFrame, plots: list[Path], out: Path
) -> list[str]:
    rows = summary.filter(pl.col("data") == data).iter_rows(named=True)
    table = _markdown_table(
        GROUP_HEADERS, ([_group_cells(row)[h] for h in GROUP_HEADERS] for row in rows)
    )
    images = [f"![{path.stem}]({Path(os.path.relpath(path, out)).as_posix()})" for path in plots]
    images = ["### Plots", *images] if images else []
    return [
        f"## {data}",
        table,
        "### Per-domain test AUC (mean over seeds)",
        _domain_table(domains.filter(pl.col("data") == data)),
        *images,
    ]


def _domain_table(domains: pl.DataFrame) -> str:
    names = domains["domain"].unique(maintain_order=True).to_list()
    table: dict[tuple, dict[str, float]] = {}
    for row in domains.iter_rows(named=True):
        key = (row["model"], group_label(row["method"], row["experts"]))
        table.setdefault(key, {})[row["domain"]] = row["auc_mean"]
    rows = (
        [model, label, *(_number(aucs.get(n)) for n in names)]
        for (model, label), aucs in table.items()
    )
    return _markdown_table(["model", "method", *names], rows)


def _diagnostics_section(diagnostics: pl.DataFrame) -> list[str]:
    """Per MoE group: the mean own-expert weight and entropy, and the domain that borrows most."""
    if diagnostics.is_empty():
        return []
    rows = []
    for key, group in diagnostics.group_by(KEYS, maintain_order=True):
        _, model, method, experts = key
        lowest = group.sort("own_weight").row(0, named=True)
        rows.append(
            [
                model,
                group_label(method, experts),
                _number(group["own_weight"].mean()),
                _number(group["entropy"].mean(), 3),
                f"{lowest['domain']} ({_number(lowest['own_weight'])})",
            ]
        )
    headers = ["model", "method", "own-expert weight", "entropy (nats)", "lowest own weight"]
    note = (
        "Test gate weight on each domain's own experts (1: stays on them), mean over domains "
        "and seeds; routing entropy, 0 for one expert and log E for uniform. Per domain in "
        "report_gate.csv."
    )
    return ["### Gate diagnostics", note, _markdown_table(headers, rows)]


def _failed_table(crashed: list[dict], dirs: Sequence[Path | str]) -> str:
    if not crashed:
        return "None."
    rows = []
    for record in crashed:
        error = record.get("error") or {}
        message = (str(error.get("message") or "").strip().splitlines() or [""])[0]
        folder = _relative(Path(record["path"]).parent, dirs)
        kind = error.get("type") or f"status {record.get('status')!r}"
        rows.append([f"`{folder}`", record["run"].get("name") or NO_VALUE, kind, message])
    return _markdown_table(["folder", "run", "error", "message"], rows)


def _relative(path: Path, dirs: Sequence[Path | str]) -> str:
    """``path`` relative to the first DIR holding it, after that DIR's name if there are several."""
    for folder in dirs:
        root = Path(folder).resolve()
        if path.is_relative_to(root):
            parts = [root.name] if len(dirs) > 1 else []
            return "/".join([*parts, *path.relative_to(root).parts]) or "."
    return str(path)


# ------------------------------------------------------------------ writing
def write_report(
    dirs: Sequence[Path | str],
    out: Path | str | None = None,
    wandb_mode: str | None = None,
    wandb_project: str = "moe_mlora",
) -> Path:
    """Write the CSVs, plots and report.md into ``out`` and print a summary; return report.md.

    ``out`` defaults to ``<first DIR>/report``; with ``wandb_mode`` ("offline"/"online") the
    tables and plots also go to one W&B run (job_type "report", grouped by the sweep folder).
    """
    if not dirs:
        raise ReportError("no folder given")
    out = Path(out) if out is not None else Path(dirs[0]) / "report"
    paths = find_results(dirs, exclude=out)
    if not paths:
        raise ReportError(
            f"no results.json under {', '.join(map(str, dirs))}; point it at a folder of runs, "
            "e.g. a sweep folder like multirun/DATE/TIME"
        )
    skipped: list[str] = []
    runs = load_runs(paths, skipped)
    for line in skipped:
        print(f"moe_mlora.report: skipped {line}", file=sys.stderr)
    if not runs:
        raise ReportError(f"none of the {len(paths)} results.json under the folders is usable")
    summary, domains, gates = summarize(runs), domain_summary(runs), gate_summary(runs)
    diagnostics = gate_diagnostics_summary(runs)
    out.mkdir(parents=True, exist_ok=True)
    summary.write_csv(out / "report.csv")
    domains.write_csv(out / "report_domains.csv")
    csvs = [out / "report.csv", out / "report_domains.csv"]
    if not diagnostics.is_empty():
        diagnostics.write_csv(out / "report_gate.csv")
        csvs.append(out / "report_gate.csv")
    plots = write_plots(summary, domains, gates, out)
    markdown = out / "report.md"
    markdown.write_text(
        markdown_report(dirs, runs, summary, domains, plots, out, diagnostics, skipped)
    )
    pngs = [path for paths in plots.values() for path in paths]
    _print_summary(runs, summary, [*csvs, markdown, *pngs])
    if wandb_mode is not None:
        tables = {"report": summary, "report_domains": domains, "report_gate": diagnostics}
        log_to_wandb(out, tables, pngs, wandb_mode, wandb_project, Path(dirs[0]))
    return markdown


def _print_summary(runs: list[dict], summary: pl.DataFrame, written: list[Path]) -> None:
    for line in mixed_overrides(runs):
        print(f"moe_mlora.report: warning: group {line}", file=sys.stderr)
    rows = [
        [_group_cells(row)[h] for h in PRINTED_HEADERS] for row in summary.iter_rows(named=True)
    ]
    print(
        f"{len(runs)} runs ({len(completed(runs))} completed, {len(failed(runs))} failed), "
        f"{summary.height} groups"
    )
    if rows:
        print(_text_table(PRINTED_HEADERS, rows))
    print("wrote:\n" + "\n".join(f"  {path}" for path in written))


def log_to_wandb(
    out: Path,
    frames: dict[str, pl.DataFrame],
    pngs: list[Path],
    mode: str,
    project: str,
    sweep: Path,
) -> Path:
    """Log the tables and plots into one W&B run next to the sweep's runs; return its folder."""
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    group = sweep_label(sweep)
    try:
        run = wandb.init(
            project=project,
            group=group,
            job_type="report",
            name=f"report-{group}",
            dir=str(out),
            mode=mode,
        )
    except wandb.errors.Error as error:
        raise ReportError(f"W&B: {error} (the local report in {out} is complete)") from None
    try:
        tables = {name: _wandb_table(frame) for name, frame in frames.items() if frame.height}
        run.log({**tables, **{f"plots/{png.stem}": wandb.Image(str(png)) for png in pngs}})
        run_dir = Path(run.dir).parent
    finally:
        run.finish()
    hint = f" · upload it with: wandb sync {run_dir}" if mode == "offline" else ""
    print(f"W&B {mode} run in {run_dir}{hint}")
    return run_dir


def _wandb_table(frame: pl.DataFrame) -> Any:
    import wandb

    return wandb.Table(columns=frame.columns, data=[list(row) for row in frame.iter_rows()])


# ------------------------------------------------------------------ command line
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; the module docstring (with examples) is its --help description."""
    parser = argparse.ArgumentParser(
        prog="python -m moe_mlora.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "dirs",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="folders searched recursively for results.json",
    )
    parser.add_argument("--out", type=Path, help="output folder (default: <first DIR>/report)")
    parser.add_argument(
        "--wandb",
        nargs="?",
        const="offline",
        choices=["offline", "online"],
        metavar="MODE",
        help="also log the tables and plots to one W&B run: offline (default) or online; "
        "put it after the DIRs",
    )
    parser.add_argument("--wandb-project", default="moe_mlora", help="W&B project")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for bad input, with a one-line error)."""
    args = parse_args(argv)
    try:
        write_report(args.dirs, args.out, args.wandb, args.wandb_project)
    except ReportError as error:
        print(f"moe_mlora.report: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
