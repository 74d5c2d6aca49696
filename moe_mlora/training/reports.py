"""What a finished phase reports: epochs, best scores, throughput, gate diagnostics.

:class:`PhaseReport` is one entry of results.json's ``phases`` and of the log's phase lines.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from moe_mlora.models.gate import own_expert_routing


@dataclass
class PhaseReport:
    """What one phase did: epochs, best validation metrics, time and throughput."""

    index: int
    kind: str
    epochs: int = 0
    best_epoch: int = -1
    best_val_wauc: float = math.nan
    best_val: dict | None = None
    wall_time_s: float = 0.0
    train_samples: int = 0
    train_seconds: float = 0.0  # training steps alone
    train_wall_seconds: float = 0.0  # per epoch, start to last batch (see TrainThroughput)
    train_samples_per_s: float = math.nan
    experts: list[dict] = field(default_factory=list)
    monitor: str = "wauc"  # the early-stopping metric (best_score is its best value)
    best_score: float = math.nan
    kept: bool = True  # False: the phase never beat the run's best (best: run), which came back
    reverted_epochs: int = 0  # epochs undone by the revert rule

    def to_json(self) -> dict:
        return asdict(self)

    def summary_line(self) -> str:
        """One line for the log when the phase ends: epochs, best score, time, speed."""
        kept = "" if self.kept else " (not kept: the run's best came back)"
        return (
            f"phase {self.index} ({self.kind}) ended after {self.epochs} epochs: best val "
            f"{self.monitor.upper()} {self.best_score:.4f} at epoch {self.best_epoch + 1}{kept} · "
            f"{self.wall_time_s:.1f}s · {self.train_samples_per_s:,.0f} samples/s"
        )

    @classmethod
    def from_json(cls, values: dict) -> PhaseReport:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in values.items() if k in known})


def metrics_to_json(result: dict | None, domain_names: list[str]) -> dict | None:
    """A DomainAUC result as plain JSON: headline numbers and a per-domain table."""
    if result is None:
        return None
    per_domain = {}
    for i, name in enumerate(domain_names):
        samples = int(result["count_per_domain"][i])
        positives = int(result["positives_per_domain"][i])
        auc = float(result["auc_per_domain"][i])
        per_domain[name] = {
            "auc": None if math.isnan(auc) else auc,
            "samples": samples,
            "positive_rate": positives / samples if samples else None,
        }
    out = {key: float(result[key]) for key in ("wauc", "mean_auc", "auc", "logloss")}
    if "wauc_error_bound" in result:  # binned AUC (evaluation.auc_bins): its worst-case error
        out["wauc_error_bound"] = float(result["wauc_error_bound"])
        out["auc_error_bound"] = float(result["overall_auc_error_bound"])
    out["per_domain"] = per_domain
    out["undefined_domains"] = list(result.get("undefined_domains", []))
    if "gate_weights" in result:
        out["gate_weights"] = {
            name: row
            for name, row in zip(domain_names, result["gate_weights"].tolist(), strict=True)
        }
        out["gate_diagnostics"] = gate_diagnostics(result, domain_names)
    return out


def gate_diagnostics(result: dict, domain_names: list[str]) -> dict:
    """Per domain: the test gate weight on the domain's own experts, and the routing entropy.

    ``own_weight`` 1 means the domain stays on its own experts (1/k each of its k); lower
    means it borrows others'. ``entropy`` (nats, mean over the domain's test rows) is 0 for
    one expert and log E for a uniform gate. The means are over domains, unweighted.
    """
    weights = result["gate_weights"]
    own = own_expert_routing(len(domain_names), weights.shape[1]).to(weights.dtype) > 0
    own_weight = (weights * own).sum(dim=1).tolist()
    entropy = result["gate_entropy"].tolist()
    per_domain = {
        name: {"own_weight": w, "entropy": h}
        for name, w, h in zip(domain_names, own_weight, entropy, strict=True)
    }
    return {
        "per_domain": per_domain,
        "mean_own_weight": sum(own_weight) / len(own_weight),
        "mean_entropy": sum(entropy) / len(entropy),
        "uniform_entropy": math.log(weights.shape[1]),
    }
