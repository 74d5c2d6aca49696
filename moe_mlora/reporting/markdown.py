"""The report's text: numbers and tables formatted for report.md and the terminal summary."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import polars as pl

from moe_mlora.reporting.plots import group_label
from moe_mlora.reporting.tables import (
    KEYS,
    completed,
    failed,
    gate_diagnostics_summary,
    mixed_overrides,
)

NO_VALUE = "—"


def _number(value: float | None, digits: int = 4, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NO_VALUE
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _percent(value: float | None, sign: bool = False) -> str:
    text = _number(value, 1, sign)
    return text if text == NO_VALUE else f"{text}%"


def group_cells(row: dict) -> dict[str, str]:
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
        "val WAUC": _number(row["val_wauc"]) + (" ★" if row["validation_choice"] else ""),
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


def text_table(headers: Sequence[str], rows: list[Sequence[str]]) -> str:
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
    "val WAUC",
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
    "val WAUC",
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
        "data, model and seed (number of seeds paired); val WAUC: the tested models' "
        "validation WAUC (mean), ★ marking the highest of each data and model, the method "
        "that selection on validation data picks; means skip NaN; "
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
        GROUP_HEADERS, ([group_cells(row)[h] for h in GROUP_HEADERS] for row in rows)
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
