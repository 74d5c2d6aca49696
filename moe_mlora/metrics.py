"""Evaluation metrics for multi-domain CTR prediction.

The headline number of the MLoRA / MoE-MLoRA papers is the *weighted AUC* (WAUC) over
domains: ``sum_d n_d * AUC_d / sum_d n_d`` with ``n_d`` the number of samples of domain ``d``
in the evaluated split. Next to it we report the mean AUC over domains, the overall AUC
(domains ignored) and the log loss.

Design choices, and why:

* AUCs are *exact* (Mann-Whitney U with average ranks, so a tie between a positive and a
  negative counts 1/2), not the binned approximation some libraries use: differences between
  methods in this literature are a few tenths of an AUC point, smaller than binning error.
* All per-domain AUCs come from one vectorised pass (a lexicographic sort by
  ``(domain, score)`` plus segment sums), never a Python loop over domains, so that
  evaluating millions of rows with hundreds of domains stays cheap.
* A domain whose evaluated samples hold a single class has no AUC. It is reported as ``nan``,
  left out of WAUC's weights and of the mean, and named in a warning; it is never counted
  as 0.5 and never raises.
* :class:`DomainAUC` keeps the raw ``(pred, target, domain)`` rows as ``cat`` states. Exact
  AUC needs every row, and concatenation is the only reduction under which the result on
  several processes (each holding a disjoint shard) equals the single-process result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

__all__ = [
    "DomainAUC",
    "binary_auc",
    "format_domain_table",
    "grouped_auc",
    "weighted_auc",
]

#: Probabilities are clamped to ``[EPS, 1 - EPS]`` before the log loss, so that a confident
#: wrong prediction costs a large but finite amount instead of ``inf``.
LOGLOSS_EPS = 1e-7

#: Domain ids are stored as float32 (see :meth:`DomainAUC.update`), exact below 2^24.
_MAX_DOMAINS = 2**24


def _check_binary_target(target: Tensor) -> None:
    """Raise unless every target is 0 or 1 (a float 0.5 label would silently be misread)."""
    if target.numel() and not bool(((target == 0) | (target == 1)).all()):
        bad = target[(target != 0) & (target != 1)][0].item()
        raise ValueError(f"target must hold only 0 and 1, found {bad!r}")


def _lexsort_group_score(preds: Tensor, group: Tensor) -> tuple[Tensor, Tensor]:
    """Order rows by ``(group, score)`` and flag where a new ``(group, score)`` run starts.

    Returns ``(order, new_run)`` with ``new_run[i]`` true iff sorted row ``i`` differs from
    row ``i - 1`` in group or score (``new_run[0]`` is true).

    Scores of at most 32-bit float precision (what :class:`DomainAUC` stores) take a fast
    path: the IEEE-754 bit pattern, remapped so that unsigned integer order equals numeric
    order, is packed with the group id into one int64 key, so a single sort does the whole
    lexsort and key equality is exactly "same group and same score". Wider scores (float64)
    would lose distinctions in that key, so they use two stable sorts instead.
    """
    n = preds.numel()
    new_run = torch.ones(n, dtype=torch.bool, device=preds.device)
    if preds.dtype in (torch.float32, torch.float16, torch.bfloat16):
        # + 0.0 turns -0.0 into +0.0, so equal scores always have equal bits.
        bits = (preds.float() + 0.0).view(torch.int32).long() & 0xFFFFFFFF
        negative = bits >= 0x80000000
        # Negatives: flip all bits (larger magnitude -> smaller key); others: set sign bit.
        bits = torch.where(negative, bits ^ 0xFFFFFFFF, bits | 0x80000000)
        key = (group << 32) | bits
        key, order = torch.sort(key)
        new_run[1:] = key[1:] != key[:-1]
        return order, new_run
    scores = preds.to(torch.float64)
    # Lexsort: sort by the secondary key, then stably by the primary key.
    order = torch.argsort(scores, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    s, g = scores[order], group[order]
    new_run[1:] = (s[1:] != s[:-1]) | (g[1:] != g[:-1])
    return order, new_run


def grouped_auc(
    preds: Tensor, target: Tensor, group: Tensor, num_groups: int
) -> tuple[Tensor, Tensor]:
    """Exact ROC AUC of every group, computed for all groups at once.

    Args:
        preds: scores, any real values (only their order matters), shape ``[N]``.
        target: binary labels (0/1, any dtype), shape ``[N]``.
        group: integer group ids in ``0..num_groups-1``, shape ``[N]``.
        num_groups: number of groups ``G``; groups without rows get ``nan``.

    Returns:
        ``(auc, count)``: ``auc`` float64 ``[G]``, ``nan`` where a group has no positive or
        no negative row; ``count`` int64 ``[G]``, rows per group.

    How: rows are sorted by ``(group, score)`` in one lexsort (no loop over groups), runs of
    equal ``(group, score)`` get the average of the ranks they span, and within each group
    ``AUC = (R_pos - P (P + 1) / 2) / (P * N)`` with ``R_pos`` the rank sum of the ``P``
    positives and ``N`` the number of negatives. Ranks are half-integers, so in float64 the
    sums are exact up to ~10^7 rows per group and accurate far beyond.
    """
    preds = preds.detach().reshape(-1)
    target = target.detach().reshape(-1)
    group = group.detach().reshape(-1)
    if not (preds.numel() == target.numel() == group.numel()):
        raise ValueError(
            f"preds, target and group must have the same number of elements, got "
            f"{preds.numel()}, {target.numel()} and {group.numel()}"
        )
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    if group.is_floating_point() or group.dtype == torch.bool:
        raise ValueError(f"group ids must be integers, got dtype {group.dtype}")
    _check_binary_target(target)
    if bool(torch.isnan(preds).any()):
        raise ValueError("preds contain nan; AUC is undefined")
    device = preds.device
    group = group.long()
    n = preds.numel()
    if n and (int(group.min()) < 0 or int(group.max()) >= num_groups):
        bad = group[(group < 0) | (group >= num_groups)][0].item()
        raise ValueError(f"group id {bad} out of range 0..{num_groups - 1}")

    count = torch.bincount(group, minlength=num_groups)
    auc = torch.full((num_groups,), math.nan, dtype=torch.float64, device=device)
    if n == 0:
        return auc, count

    order, new_run = _lexsort_group_score(preds, group)
    g, t = group[order], target[order].to(torch.float64)

    # Runs of identical (group, score) are ties; each row gets its run's average rank.
    run_id = torch.cumsum(new_run, 0) - 1
    run_len = torch.bincount(run_id)
    run_end = torch.cumsum(run_len, 0)  # 1-based global rank of a run's last row
    run_start = run_end - run_len  # 0-based index of a run's first row
    avg_rank = (run_start + run_end + 1).to(torch.float64) / 2  # mean of ranks start+1..end
    # Runs never cross groups, so subtracting the group's offset gives in-group ranks.
    group_offset = torch.cumsum(count, 0) - count
    rank = avg_rank[run_id] - group_offset[g].to(torch.float64)

    num_pos = torch.zeros(num_groups, dtype=torch.float64, device=device).index_add_(0, g, t)
    rank_sum_pos = torch.zeros(num_groups, dtype=torch.float64, device=device).index_add_(
        0, g, rank * t
    )
    num_neg = count.to(torch.float64) - num_pos
    defined = (num_pos > 0) & (num_neg > 0)
    u_stat = rank_sum_pos - num_pos * (num_pos + 1) / 2
    auc = torch.where(defined, u_stat / (num_pos * num_neg).clamp_min(1), auc)
    return auc, count


def binary_auc(preds: Tensor, target: Tensor) -> float:
    """Exact ROC AUC (ties count 1/2); ``nan`` if ``target`` is empty or single-class."""
    preds = preds.reshape(-1)
    zeros = torch.zeros(preds.numel(), dtype=torch.long, device=preds.device)
    auc, _ = grouped_auc(preds, target, zeros, 1)
    return float(auc[0])


def weighted_auc(auc: Tensor, count: Tensor) -> float:
    """``sum_d n_d AUC_d / sum_d n_d`` over the groups whose AUC is defined (not ``nan``).

    Undefined groups are dropped from numerator *and* denominator, rather than counted as
    0.5, so a single-class domain neither drags the score towards chance nor inflates it.
    Returns ``nan`` when no group is defined.
    """
    auc = auc.detach().to(torch.float64).reshape(-1)
    count = count.detach().to(torch.float64).reshape(-1)
    if auc.shape != count.shape:
        raise ValueError(f"auc and count must have the same shape, got {auc.shape}, {count.shape}")
    defined = ~torch.isnan(auc)
    total = count[defined].sum()
    if not bool(defined.any()) or float(total) <= 0:
        return math.nan
    return float((auc[defined] * count[defined]).sum() / total)


class DomainAUC(Metric):
    """Per-domain exact AUC, weighted AUC (headline), mean AUC, overall AUC and log loss.

    Use it as an accumulator: call :meth:`update` in every validation/test step and
    :meth:`compute` once at the end of the epoch. (``forward`` / ``__call__`` also works but
    computes on the single batch, where many domains may be single-class and warn.)

    The states are ``cat`` lists of all rows. Under DDP every process holds a disjoint
    shard; ``compute`` gathers and concatenates them, so every process returns the same
    result as one process over all rows. The metric never duplicates rows itself, but a
    ``DistributedSampler`` that pads shards to equal length does - evaluate with a sampler
    that does not pad (or on one process) when exact numbers matter.

    Args:
        num_domains: number of domains ``D``; ids must be ``0..D-1``.
        domain_names: optional display names, one per domain, used in warnings and in
            ``undefined_domains``; defaults to ``str(id)``.
        **kwargs: forwarded to :class:`torchmetrics.Metric` (e.g. ``compute_on_cpu=True`` to
            keep the accumulated rows off the GPU).
    """

    full_state_update: bool = False
    higher_is_better: bool = True
    is_differentiable: bool = False

    preds: list[Tensor] | Tensor
    target: list[Tensor] | Tensor
    domain: list[Tensor] | Tensor

    def __init__(
        self, num_domains: int, domain_names: Sequence[str] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if not 1 <= num_domains <= _MAX_DOMAINS:
            raise ValueError(f"num_domains must be in 1..{_MAX_DOMAINS}, got {num_domains}")
        if domain_names is not None and len(domain_names) != num_domains:
            raise ValueError(
                f"domain_names has {len(domain_names)} entries but num_domains is {num_domains}"
            )
        self.num_domains = int(num_domains)
        self.domain_names: tuple[str, ...] = (
            tuple(str(name) for name in domain_names)
            if domain_names is not None
            else tuple(str(d) for d in range(num_domains))
        )
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self.add_state("domain", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor, domain: Tensor) -> None:
        """Store one batch of probabilities, 0/1 labels and domain ids (all 1-D, same length).

        Raises ``ValueError`` on mismatched or non-1-D shapes, probabilities outside [0, 1]
        (including ``nan``; usually logits passed by mistake or a diverged model), labels
        other than 0/1, or domain ids outside ``0..D-1``.
        """
        if preds.ndim != 1 or target.ndim != 1 or domain.ndim != 1:
            raise ValueError(
                "preds, target and domain must be 1-D (squeeze a trailing dim of size 1), got "
                f"shapes {tuple(preds.shape)}, {tuple(target.shape)}, {tuple(domain.shape)}"
            )
        if not (preds.shape == target.shape == domain.shape):
            raise ValueError(
                "preds, target and domain must have the same shape, got "
                f"{tuple(preds.shape)}, {tuple(target.shape)}, {tuple(domain.shape)}"
            )
        if not preds.is_floating_point():
            raise ValueError(f"preds must be floating-point probabilities, got {preds.dtype}")
        if domain.is_floating_point() or domain.dtype == torch.bool:
            raise ValueError(f"domain ids must be integers, got dtype {domain.dtype}")
        if preds.numel() == 0:
            return
        preds = preds.detach()
        outside = ~((preds >= 0) & (preds <= 1))  # also catches nan
        if bool(outside.any()):
            bad = preds[outside][0].item()
            raise ValueError(f"preds must be probabilities in [0, 1] (apply sigmoid), found {bad}")
        _check_binary_target(target)
        dmin, dmax = (int(v) for v in domain.aminmax())
        if dmin < 0 or dmax >= self.num_domains:
            bad = dmin if dmin < 0 else dmax
            raise ValueError(
                f"domain id {bad} out of range: expected 0..{self.num_domains - 1} "
                f"(num_domains={self.num_domains})"
            )
        # All three states are float32 on purpose: when a process has seen no rows,
        # torchmetrics' sync substitutes an empty tensor of the metric's dtype (float32), and
        # all_gather needs the same dtype on every process. Ids < 2^24 are exact in float32.
        self.preds.append(preds.float())
        self.target.append(target.detach().float())
        self.domain.append(domain.detach().float())

    def _rows(self) -> tuple[Tensor, Tensor, Tensor]:
        """All accumulated rows; empty tensors if nothing was stored (cat of [] would raise)."""
        if isinstance(self.preds, list) and len(self.preds) == 0:
            empty_long = torch.zeros(0, dtype=torch.long, device=self.device)
            return torch.zeros(0, device=self.device), empty_long, empty_long.clone()
        preds = dim_zero_cat(self.preds).float()
        target = dim_zero_cat(self.target).long()
        domain = dim_zero_cat(self.domain).long()
        return preds, target, domain

    def compute(self) -> dict[str, Any]:
        """Aggregate all rows (across processes, if distributed).

        Returns a dict with:
            ``wauc``: weighted AUC over defined domains (float, ``nan`` if none defined);
            ``mean_auc``: unweighted mean AUC over defined domains (float);
            ``auc``: overall AUC ignoring domains (float);
            ``logloss``: mean binary cross-entropy, preds clamped to [1e-7, 1 - 1e-7] (float);
            ``auc_per_domain``: float64 ``[D]``, ``nan`` where undefined;
            ``count_per_domain``, ``positives_per_domain``: int64 ``[D]``;
            ``undefined_domains``: names of domains without an AUC (list of str).
        """
        preds, target, domain = self._rows()
        auc_d, count_d = grouped_auc(preds, target, domain, self.num_domains)
        positives_d = torch.bincount(
            domain, weights=target.to(torch.float64), minlength=self.num_domains
        )
        positives_d = positives_d.round().long()

        undefined = torch.isnan(auc_d)
        undefined_names = [self.domain_names[d] for d in undefined.nonzero().flatten().tolist()]
        wauc = weighted_auc(auc_d, count_d)
        defined_auc = auc_d[~undefined]
        mean_auc = float(defined_auc.mean()) if defined_auc.numel() else math.nan

        if undefined_names:
            details = ", ".join(
                f"{self.domain_names[d]} (n={int(count_d[d])}, positives={int(positives_d[d])})"
                for d in undefined.nonzero().flatten().tolist()
            )
            message = (
                f"DomainAUC: {len(undefined_names)} of {self.num_domains} domain(s) hold a "
                f"single class or no samples, so have no AUC; they are reported as nan and "
                f"left out of WAUC and mean AUC: {details}."
            )
            if len(undefined_names) == self.num_domains:
                message += " No domain has an AUC, so WAUC is nan."
            rank_zero_warn(message, category=UserWarning)

        if preds.numel():
            p = preds.to(torch.float64).clamp(LOGLOSS_EPS, 1 - LOGLOSS_EPS)
            logloss = float(torch.nn.functional.binary_cross_entropy(p, target.to(torch.float64)))
        else:
            logloss = math.nan

        return {
            "wauc": wauc,
            "mean_auc": mean_auc,
            "auc": binary_auc(preds, target),
            "logloss": logloss,
            "auc_per_domain": auc_d,
            "count_per_domain": count_d,
            "positives_per_domain": positives_d,
            "undefined_domains": undefined_names,
        }


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
