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

Options are key=value (out=OUT, wandb=offline|online, wandb_project=NAME), like every
moe_mlora command; --out OUT and the other flags below work too.

examples:
  python -m moe_mlora.report multirun/2026-11-24/10-00-00
  python -m moe_mlora.report multirun/2026-11-24/* outputs out=reports/nov24
  python -m moe_mlora.report multirun/2026-11-24/10-00-00 wandb=offline     # offline W&B run
  python -m moe_mlora.report multirun/2026-11-24/10-00-00 wandb=online wandb_project=x
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from moe_mlora.cli import key_value_argv
from moe_mlora.pipeline.schema import RecordError, RunRecord
from moe_mlora.reporting.markdown import PRINTED_HEADERS, group_cells, markdown_report, text_table
from moe_mlora.reporting.plots import write_plots
from moe_mlora.reporting.tables import (
    completed,
    domain_summary,
    failed,
    gate_diagnostics_summary,
    gate_summary,
    mixed_overrides,
    summarize,
)
from moe_mlora.sweep import sweep_label


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
    rows = [[group_cells(row)[h] for h in PRINTED_HEADERS] for row in summary.iter_rows(named=True)]
    print(
        f"{len(runs)} runs ({len(completed(runs))} completed, {len(failed(runs))} failed), "
        f"{summary.height} groups"
    )
    if rows:
        print(text_table(PRINTED_HEADERS, rows))
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
    argv = list(sys.argv[1:] if argv is None else argv)
    return parser.parse_args(key_value_argv(parser, argv))


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
