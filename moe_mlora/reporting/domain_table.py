"""The per-domain AUC table that a run prints to its log after testing."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def format_domain_table(result: dict[str, Any], domain_names: Sequence[str] | None = None) -> str:
    """Render a :meth:`DomainAUC.compute` result as a fixed-width text table for logs.

    One row per domain (name, samples, positive rate, AUC or ``undefined``), then the
    summary lines (WAUC, mean AUC, overall AUC, log loss). ``domain_names`` defaults to ids.
    """
    auc = result["auc_per_domain"].detach().cpu().tolist()
    count = result["count_per_domain"].detach().cpu().tolist()
    positives = result["positives_per_domain"].detach().cpu().tolist()
    names = [str(n) for n in domain_names] if domain_names is not None else None
    if names is None or len(names) != len(auc):
        names = [str(d) for d in range(len(auc))]

    summary_labels = (("mean_auc", "mean AUC"), ("auc", "overall AUC"), ("logloss", "logloss"))
    width = max(len("overall AUC"), *(len(n) for n in names))
    header = f"{'domain':<{width}}  {'samples':>10}  {'pos_rate':>8}  {'AUC':>9}"
    lines = [header, "-" * len(header)]
    for name, a, n, p in zip(names, auc, count, positives, strict=True):
        rate = f"{p / n:8.4f}" if n else f"{'-':>8}"
        auc_text = "undefined" if math.isnan(a) else f"{a:9.4f}"
        lines.append(f"{name:<{width}}  {n:>10d}  {rate}  {auc_text:>9}")
    lines.append("-" * len(header))

    def _fmt(value: Any) -> str:
        value = float(value)
        return "undefined" if math.isnan(value) else f"{value:.4f}"

    lines.append(f"{'WAUC':<{width}}  {sum(count):>10d}  {'':>8}  {_fmt(result['wauc']):>9}")
    for key, label in summary_labels:
        lines.append(f"{label:<{width}}  {'':>10}  {'':>8}  {_fmt(result[key]):>9}")
    return "\n".join(lines)
