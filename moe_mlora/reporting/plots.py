"""The report's PNG plots (``python -m moe_mlora.report``), drawn from its polars tables.

Figures are built on matplotlib's Agg canvas directly (no pyplot), so nothing needs a display and
no global matplotlib state changes when the report is used from a notebook.  Every plot function
returns the path it wrote, or None when its data is absent (e.g. no moe_mlora runs: no heatmaps).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

METHOD_ORDER = {
    "base": 0,
    "mlora": 1,
    "moe_mlora": 2,
    "moe_mlora/paper": 3,
    "moe_mlora/reference": 4,
    "moe_mlora/warm": 5,
}
MOE = "moe_mlora"  # its groups are labelled moe_mlora/<schedule> (plain moe_mlora: older runs)
# base and mlora have no experts: drawn as horizontal reference lines on the WAUC-vs-experts plot
REFERENCE_STYLE = {"base": ("gray", "--"), "mlora": ("tab:orange", ":")}


def method_rank() -> pl.Expr:
    """Sort key putting methods in the paper's order (base, mlora, moe_mlora), others last."""
    return pl.col("method").replace_strict(
        METHOD_ORDER, default=len(METHOD_ORDER), return_dtype=pl.Int64
    )


def group_label(method: str, experts: int | None) -> str:
    """How a (method, experts) group is named in legends and tables, e.g. ``moe_mlora e4``."""
    return method if experts is None else f"{method} e{experts}"


def safe_name(text: str) -> str:
    """A file-name-safe version of a data/model name (it also goes into markdown image links)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text))


def write_plots(
    summary: pl.DataFrame, domains: pl.DataFrame, gates: pl.DataFrame, out: Path
) -> dict[str, list[Path]]:
    """All plots for every data set, keyed by data so the markdown can embed them per section."""
    plots: dict[str, list[Path]] = {}
    for data in summary["data"].unique(maintain_order=True).to_list():
        name = safe_name(data)
        paths = [
            plot_wauc_vs_experts(summary, data, out / f"wauc_vs_experts_{name}.png"),
            plot_domain_auc(domains, data, out / f"domain_auc_{name}.png"),
        ]
        keys = gates.filter(pl.col("data") == data).select("model", "method", "experts")
        for model, method, experts in keys.unique(maintain_order=True).iter_rows():
            rows = gates.filter(
                pl.col("data") == data,
                pl.col("model") == model,
                pl.col("method") == method,
                pl.col("experts") == experts,
            )
            schedule = method.partition("/")[2]  # moe_mlora/warm -> warm; plain moe_mlora: none
            label = f"_{safe_name(schedule)}" if schedule else ""
            path = out / f"gate_weights_{name}_{safe_name(model)}{label}_e{experts}.png"
            title = f"{data} · {model} · {method} · {experts} experts"
            paths.append(plot_gate_weights(rows, title, path))
        plots[data] = [path for path in paths if path is not None]
    return plots


# ------------------------------------------------------------- WAUC vs experts
def plot_wauc_vs_experts(summary: pl.DataFrame, data: str, path: Path) -> Path | None:
    """One panel per backbone: moe_mlora WAUC (± std) against experts, base/mlora as lines."""
    rows = summary.filter(pl.col("data") == data)
    moe = rows.filter(pl.col("method").str.starts_with(MOE), pl.col("experts").is_not_null())
    models = moe["model"].unique(maintain_order=True).to_list()  # backbones with experts only
    if not models:
        return None
    columns = min(3, len(models))
    fig = _figure(max(7.0, 5.0 * columns), 3.8 * math.ceil(len(models) / columns))
    axes = list(fig.subplots(math.ceil(len(models) / columns), columns, squeeze=False).flat)
    for ax, model in zip(axes, models, strict=False):
        _wauc_panel(ax, rows.filter(pl.col("model") == model), model)
    for ax in axes[len(models) :]:
        ax.set_visible(False)
    fig.suptitle(f"{data}: test WAUC vs experts (mean ± std over seeds)")
    return _save(fig, path)


def _wauc_panel(ax, rows: pl.DataFrame, model: str) -> None:
    moe = rows.filter(pl.col("method").str.starts_with(MOE), pl.col("experts").is_not_null())
    experts = sorted(set(moe["experts"].to_list()))
    for label in moe.sort(method_rank())["method"].unique(maintain_order=True).to_list():
        line = moe.filter(pl.col("method") == label).sort("experts")
        ax.errorbar(
            line["experts"].to_list(),
            line["wauc_mean"].to_numpy(),
            yerr=line["wauc_std"].fill_nan(0.0).to_numpy(),
            marker="o",
            capsize=3,
            label=label,
        )
    for method, (color, style) in REFERENCE_STYLE.items():
        reference = rows.filter(pl.col("method") == method)
        if reference.is_empty():
            continue
        mean, std = reference["wauc_mean"][0], reference["wauc_std"][0]
        ax.axhline(mean, color=color, linestyle=style, label=f"{method} {mean:.4f}")
        if math.isfinite(std):
            ax.axhspan(mean - std, mean + std, color=color, alpha=0.12)
    if experts and max(experts) >= 8 * max(min(experts), 1):
        ax.set_xscale("log", base=2)
    if experts:
        ax.set_xticks(experts, [str(e) for e in experts])
        ax.minorticks_off()
    ax.set(title=model, xlabel="experts", ylabel="test WAUC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


# ------------------------------------------------------------- per-domain AUC
def plot_domain_auc(domains: pl.DataFrame, data: str, path: Path) -> Path | None:
    """Grouped bars of per-domain test AUC, one bar per method/experts group.

    Each bar is the mean over backbones of the per-backbone mean over seeds, so every backbone
    weighs the same whatever its number of seeds.
    """
    rows = domains.filter(pl.col("data") == data, pl.col("auc_mean").is_not_nan())
    if rows.is_empty():
        return None
    names = rows["domain"].unique(maintain_order=True).to_list()
    bars = rows.group_by("method", "experts", "domain").agg(pl.col("auc_mean").mean())
    groups = bars.select("method", "experts").unique().sort(method_rank(), "method", "experts")
    width = 0.8 / groups.height
    fig = _figure(min(20.0, max(8.0, 0.15 * len(names) * groups.height + 3)), 5.0)
    ax = fig.subplots()
    for i, (method, experts) in enumerate(groups.iter_rows()):
        group = bars.filter(pl.col("method") == method, pl.col("experts").eq_missing(experts))
        auc = dict(group.select("domain", "auc_mean").iter_rows())
        heights = [auc.get(name, math.nan) for name in names]
        offset = (i - (groups.height - 1) / 2) * width
        ax.bar(np.arange(len(names)) + offset, heights, width, label=group_label(method, experts))
    low, high = bars["auc_mean"].min(), bars["auc_mean"].max()
    ax.set_ylim(max(0.0, low - 0.03), min(1.0, high + 0.02))  # AUC differences are small
    rotate = len(names) > 6
    ax.set_xticks(
        np.arange(len(names)),
        names,
        rotation=45 if rotate else 0,
        ha="right" if rotate else "center",
    )
    ax.set(ylabel="test AUC", title=f"{data}: per-domain test AUC (mean over backbones and seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


# ------------------------------------------------------------- gate weights
def plot_gate_weights(gates: pl.DataFrame, title: str, path: Path) -> Path | None:
    """Heatmap of the mean gate weight per (domain, expert): which experts each domain uses."""
    if gates.is_empty():
        return None
    names = gates.sort("position")["domain"].unique(maintain_order=True).to_list()
    experts = int(gates["expert"].max()) + 1
    matrix = np.full((len(names), experts), np.nan)
    row = {name: i for i, name in enumerate(names)}
    for domain, expert, weight in gates.select("domain", "expert", "weight").iter_rows():
        matrix[row[domain], expert] = weight
    fig = _figure(
        min(16.0, max(5.0, 0.25 * experts + 3)), min(20.0, max(3.0, 0.3 * len(names) + 1.5))
    )
    ax = fig.subplots()
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0)
    fig.colorbar(image, ax=ax, label="mean gate weight")
    step = max(1, math.ceil(experts / 32))
    ax.set_xticks(range(0, experts, step))
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="expert", ylabel="domain", title=f"{title}\ntest gate weights (mean over seeds)")
    if matrix.size <= 160:  # small enough to print the values
        _annotate(ax, matrix)
    return _save(fig, path)


def _annotate(ax, matrix: np.ndarray) -> None:
    bright = np.nanmax(matrix) * 0.6
    for (row, column), value in np.ndenumerate(matrix):
        color = "black" if value > bright else "white"
        ax.text(column, row, f"{value:.2f}", ha="center", va="center", color=color, fontsize=8)


# ------------------------------------------------------------- helpers
def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path
