"""Evaluation metrics for multi-domain CTR prediction.

The headline number of the MLoRA / MoE-MLoRA papers is the *weighted AUC* (WAUC) over
domains: ``sum_d n_d * AUC_d / sum_d n_d`` with ``n_d`` the number of samples of domain ``d``
in the evaluated split. Next to it we report the mean AUC over domains, the overall AUC
(domains ignored) and the log loss.

Design choices, and why:

* AUCs are *exact* by default (Mann-Whitney U with average ranks, so a tie between a positive
  and a negative counts 1/2), not the binned approximation some libraries use: differences
  between methods in this literature are a few tenths of an AUC point, smaller than the error
  of a coarse binning.
* All per-domain AUCs come from one vectorised pass (:mod:`moe_mlora.auc`) (a lexicographic sort by
  ``(domain, score)`` plus segment sums), never a Python loop over domains, so that
  evaluating millions of rows with hundreds of domains stays cheap.
* A domain whose evaluated samples hold a single class has no AUC. It is reported as ``nan``,
  left out of WAUC's weights and of the mean, and named in a warning; it is never counted
  as 0.5 and never raises.
* In exact mode :class:`DomainAUC` keeps the raw ``(pred, target, domain)`` rows as ``cat``
  states, on the CPU. Exact AUC needs every row, and concatenation is the only reduction
  under which the result on several processes (each holding a disjoint shard) equals the
  single-process result; the CPU has the room for them, the accelerator should not spend it.
* For sets too large to keep, ``DomainAUC(..., bins=B)`` keeps per-domain histograms instead
  (memory ``O(D * B)`` whatever the number of rows, summed across processes) and reports,
  with every AUC, a guaranteed bound on its distance from the exact value (see
  :func:`histogram_auc`), so one can check that the binning error is far below the
  differences being compared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from moe_mlora.auc import (
    binary_auc,
    check_bins,
    check_metric_batch,
    grouped_auc,
    histogram_auc,
    weighted_auc,
)

__all__ = [
    "DomainAUC",
    "binary_auc",
    "grouped_auc",
    "histogram_auc",
    "weighted_auc",
]

#: Probabilities are clamped to ``[EPS, 1 - EPS]`` before the log loss, so that a confident
#: wrong prediction costs a large but finite amount instead of ``inf``.
LOGLOSS_EPS = 1e-7

#: Domain ids are stored as float32 (see :meth:`DomainAUC._store_rows`), exact below 2^24.
_MAX_DOMAINS = 2**24


def _nanmean(values: Tensor) -> float:
    """Mean of the non-``nan`` entries; ``nan`` if there are none."""
    defined = values[~torch.isnan(values)]
    return float(defined.mean()) if defined.numel() else math.nan


def _gather_device(group: Any, fallback: torch.device) -> torch.device:
    """Device on which a collective over ``group`` can run.

    The CPU when the backend handles CPU tensors (gloo, mpi, ucc, or a ``cpu:`` entry of a
    multi-device backend such as ``cpu:gloo,cuda:nccl``); otherwise (NCCL alone) ``fallback``,
    the metric's device, because NCCL only moves accelerator tensors.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return fallback
    backend = str(dist.get_backend(group)).lower()
    if "cpu:" in backend or backend in ("gloo", "mpi", "ucc"):
        return torch.device("cpu")
    return fallback


PER_DOMAIN_KEYS = ("auc_per_domain", "count_per_domain", "positives_per_domain", "auc_error_bound")


class DomainAUC(Metric):
    """Per-domain AUC, weighted AUC (headline), mean AUC, overall AUC and log loss.

    Use it as an accumulator: call :meth:`update` in every validation/test step and
    :meth:`compute` once at the end of the epoch. (``forward`` / ``__call__`` also works but
    computes on the single batch, where many domains may be single-class and warn.)

    Two modes:

    * **Exact** (``bins=None``, the default): the states are ``cat`` lists of all rows,
      float32 and always on the CPU. :meth:`update` copies each batch to the CPU, and moving
      the metric (``.to("cuda")``, as Lightning does with a module's metrics) leaves stored
      rows there, so a GPU evaluation never holds ``N`` rows on the device. ``compute`` sorts
      all rows once by ``(domain, score)`` (plus one sort by score for the overall AUC); it
      never builds per-domain copies of the rows, so its working memory is a few ``O(N)``
      buffers whatever the number of domains. Under DDP the sync gathers and concatenates the
      shards on the CPU when the backend can (gloo); under NCCL, which only moves device
      tensors, each state goes to the metric's device for the gather and the gathered rows
      come straight back to the CPU (so the device holds them only during the sync).
      ``compute_on_cpu`` is therefore not needed.
    * **Binned** (``bins=B``): for sets too large to keep. The states are per-domain counts of
      positives and negatives in ``B`` equal-width probability bins over ``[0, 1]`` (int64
      ``[D, B]``) and the summed log loss (float64): memory ``O(D * B)`` whatever the number of
      rows, on the metric's device, sum-reduced across processes. AUCs come from
      :func:`histogram_auc`, which also bounds their error; ``compute`` adds those bounds
      to its result. Log loss, counts and positives are exact, as in exact mode.

    Under DDP every process holds a disjoint shard and every process's ``compute`` returns
    the single-process result. The metric never duplicates rows itself, but a
    ``DistributedSampler`` that pads shards to equal length does - evaluate with a sampler
    that does not pad (or on one process) when exact numbers matter.

    Args:
        num_domains: number of domains ``D``; ids must be ``0..D-1``.
        domain_names: optional display names, one per domain, used in warnings and in
            ``undefined_domains``; defaults to ``str(id)``.
        bins: ``None`` for exact AUCs, or the number of bins ``B >= 2`` of the bounded-memory
            mode. The error bound shrinks roughly like ``1 / (2 * bins the scores spread
            over)``; bins are equal-width, so scores crowded near 0 (low CTR) use few of them
            and need a larger ``B``. Read ``auc_error_bound`` / ``wauc_error_bound`` rather
            than assuming a size is enough.
        **kwargs: forwarded to :class:`torchmetrics.Metric`.
    """

    full_state_update: bool = False
    higher_is_better: bool = True
    is_differentiable: bool = False

    #: States of the exact mode, kept on the CPU (see the class docstring).
    _ROW_STATES: tuple[str, ...] = ("preds", "target", "domain")

    preds: list[Tensor] | Tensor
    target: list[Tensor] | Tensor
    domain: list[Tensor] | Tensor
    pos_hist: Tensor
    neg_hist: Tensor
    bce_sum: Tensor

    def __init__(
        self,
        num_domains: int,
        domain_names: Sequence[str] | None = None,
        bins: int | None = None,
        **kwargs: Any,
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
        self.bins: int | None = check_bins(bins)
        if self.bins is None:
            for name in self._ROW_STATES:
                self.add_state(name, default=[], dist_reduce_fx="cat")
        else:
            shape = (self.num_domains, self.bins)
            self.add_state("pos_hist", torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state("neg_hist", torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state("bce_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    # ------------------------------------------------------------------------------ update

    def update(self, preds: Tensor, target: Tensor, domain: Tensor) -> None:
        """Add one batch of probabilities, 0/1 labels and domain ids (all 1-D, same length).

        Raises ``ValueError`` on mismatched or non-1-D shapes, probabilities outside [0, 1]
        (including ``nan``; usually logits passed by mistake or a diverged model), labels
        other than 0/1, or domain ids outside ``0..D-1``.
        """
        check_metric_batch(preds, target, domain, self.num_domains)
        if preds.numel() == 0:
            return
        # float32 scores in both modes, so that the binned mode bins exactly the values the
        # exact mode ranks (which its error bound relies on).
        preds, target, domain = preds.detach().float(), target.detach(), domain.detach()
        if self.bins is None:
            self._store_rows(preds, target, domain)
        else:
            self._count_rows(preds, target, domain, self.bins)

    def _store_rows(self, preds: Tensor, target: Tensor, domain: Tensor) -> None:
        """Exact mode: append the batch, as float32, on the CPU.

        All three states are float32 on purpose: when a process has seen no rows,
        torchmetrics' sync substitutes an empty tensor of the metric's dtype (float32), and
        all_gather needs the same dtype on every process. Ids < 2^24 are exact in float32.
        """
        self.preds.append(preds.cpu())
        self.target.append(target.float().cpu())
        self.domain.append(domain.float().cpu())

    def _count_rows(self, preds: Tensor, target: Tensor, domain: Tensor, bins: int) -> None:
        """Binned mode: add the batch to the ``[D, B]`` histograms and the summed log loss.

        Bin ``floor(p * B)`` (``p = 1`` joins the last bin), computed in float64 where the
        product of a float32 and an integer below 2^29 is exact; any rounding would still
        keep the binning non-decreasing in ``p``, which is all the error bound needs.
        ``index_add_`` into the flat histogram costs ``O(rows)`` per batch, where a
        ``bincount`` with ``minlength=D*B`` would allocate and fill ``D * B`` counts.
        """
        device = self.pos_hist.device
        bin_index = (preds.double() * bins).long().clamp_(max=bins - 1)
        key = (domain.long() * bins + bin_index).to(device)
        positive = (target == 1).to(device)
        for hist, rows in ((self.pos_hist, key[positive]), (self.neg_hist, key[~positive])):
            hist.view(-1).index_add_(0, rows, torch.ones_like(rows))
        p = preds.double().clamp(LOGLOSS_EPS, 1 - LOGLOSS_EPS)
        bce = torch.nn.functional.binary_cross_entropy(p, target.double(), reduction="sum")
        self.bce_sum += bce.to(device)

    # ----------------------------------------------------------------- device and sync

    def _apply(self, fn: Callable[[Tensor], Tensor], exclude_state: Sequence[str] = "") -> Any:
        """Move the metric's states as usual, with two exceptions.

        * The exact mode's rows stay on the CPU (moving the module must not put them on the
          accelerator).
        * No state changes dtype. The dtypes are chosen for exactness and for the sync
          (int64 counts, a float64 log-loss sum, float32 rows of the same dtype on every
          rank), and ``LightningModule.to(torch.bfloat16)`` (``precision="bf16-true"``) or
          ``set_dtype`` would otherwise round them.
        """
        if getattr(self, "bins", None) is None:
            exclude_state = (*exclude_state, *self._ROW_STATES)

        def keep_dtype(tensor: Tensor) -> Tensor:
            return fn(tensor).to(dtype=tensor.dtype)

        return super()._apply(keep_dtype, exclude_state=exclude_state)

    def _sync_dist(
        self,
        dist_sync_fn: Callable[..., list[Tensor]] = gather_all_tensors,
        process_group: Any | None = None,
    ) -> None:
        """Gather states across processes; in exact mode on the CPU where the backend allows.

        The rows are on the CPU (see :meth:`_store_rows`). A CPU-capable backend (gloo) gathers
        them there; under NCCL each state is moved to the metric's device for the collective
        and every gathered shard is moved straight back to the CPU.
        """
        if self.bins is not None:
            super()._sync_dist(dist_sync_fn, process_group=process_group)
            return
        device = _gather_device(process_group or self.process_group, self.device)

        def gather_on_device(tensor: Tensor, group: Any | None = None) -> list[Tensor]:
            return [part.cpu() for part in dist_sync_fn(tensor.to(device), group=group)]

        super()._sync_dist(gather_on_device, process_group=process_group)

    # ----------------------------------------------------------------------------- compute

    def _rows(self) -> tuple[Tensor, Tensor, Tensor]:
        """All accumulated rows; empty tensors if nothing was stored (cat of [] would raise)."""
        if isinstance(self.preds, list) and len(self.preds) == 0:
            empty_long = torch.zeros(0, dtype=torch.long)
            return torch.zeros(0), empty_long, empty_long.clone()
        preds = dim_zero_cat(self.preds).float()
        target = dim_zero_cat(self.target).long()
        domain = dim_zero_cat(self.domain).long()
        return preds, target, domain

    def _wrap_compute(self, compute: Callable) -> Callable:
        """torchmetrics squeezes one-element tensors of the result; with one domain (plain
        CTR) that would turn the ``[D]`` per-domain tensors into scalars, so undo it."""
        wrapped = super()._wrap_compute(compute)

        def with_domain_axis(*args, **kwargs):
            result = wrapped(*args, **kwargs)
            for key in PER_DOMAIN_KEYS:
                if isinstance(result.get(key), Tensor):
                    result[key] = result[key].reshape(-1)
            return result

        return with_domain_axis

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

        In binned mode the AUCs are the histogram estimates and the dict also holds
        guaranteed bounds on their absolute error against the exact values:
            ``auc_error_bound``: float64 ``[D]``, per domain, ``nan`` where undefined;
            ``wauc_error_bound``: the same sample-weighted mean as WAUC, of those bounds;
            ``mean_auc_error_bound``: their unweighted mean over defined domains;
            ``overall_auc_error_bound``: the bound for ``auc``.
        (A mean of per-domain errors is at most the same mean of their bounds.)
        """
        if self.bins is None:
            return self._compute_exact()
        return self._compute_binned()

    def _compute_exact(self) -> dict[str, Any]:
        """Exact AUCs from the rows: one grouped lexsort, one sort for the overall AUC."""
        preds, target, domain = self._rows()
        auc_d, count_d = grouped_auc(preds, target, domain, self.num_domains)
        positives_d = torch.bincount(
            domain, weights=target.to(torch.float64), minlength=self.num_domains
        )
        positives_d = positives_d.round().long()
        if preds.numel():
            p = preds.to(torch.float64).clamp(LOGLOSS_EPS, 1 - LOGLOSS_EPS)
            logloss = float(torch.nn.functional.binary_cross_entropy(p, target.to(torch.float64)))
        else:
            logloss = math.nan
        return self._result(auc_d, count_d, positives_d, binary_auc(preds, target), logloss)

    def _compute_binned(self) -> dict[str, Any]:
        """Histogram AUCs and their error bounds; overall = histograms summed over domains."""
        pos, neg = self.pos_hist, self.neg_hist
        auc_d, bound_d = histogram_auc(pos, neg)
        positives_d = pos.sum(dim=1)
        count_d = positives_d + neg.sum(dim=1)
        auc_all, bound_all = histogram_auc(pos.sum(0, keepdim=True), neg.sum(0, keepdim=True))
        total = int(count_d.sum())
        logloss = float(self.bce_sum) / total if total else math.nan
        result = self._result(auc_d, count_d, positives_d, float(auc_all[0]), logloss)
        result["auc_error_bound"] = bound_d.cpu()
        result["wauc_error_bound"] = weighted_auc(bound_d, count_d)
        result["mean_auc_error_bound"] = _nanmean(bound_d)
        result["overall_auc_error_bound"] = float(bound_all[0])
        return result

    def _result(
        self, auc_d: Tensor, count_d: Tensor, positives_d: Tensor, auc: float, logloss: float
    ) -> dict[str, Any]:
        """The result dict shared by both modes (per-domain tensors on the CPU); warns about
        domains without an AUC."""
        undefined = torch.isnan(auc_d).nonzero().flatten().tolist()
        self._warn_undefined(undefined, count_d, positives_d)
        return {
            "wauc": weighted_auc(auc_d, count_d),
            "mean_auc": _nanmean(auc_d),
            "auc": auc,
            "logloss": logloss,
            "auc_per_domain": auc_d.cpu(),
            "count_per_domain": count_d.cpu(),
            "positives_per_domain": positives_d.cpu(),
            "undefined_domains": [self.domain_names[d] for d in undefined],
        }

    def _warn_undefined(self, undefined: list[int], count_d: Tensor, positives_d: Tensor) -> None:
        """Name every domain without an AUC (single class or no samples) in one warning."""
        if not undefined:
            return
        details = ", ".join(
            f"{self.domain_names[d]} (n={int(count_d[d])}, positives={int(positives_d[d])})"
            for d in undefined
        )
        message = (
            f"DomainAUC: {len(undefined)} of {self.num_domains} domain(s) hold a "
            f"single class or no samples, so have no AUC; they are reported as nan and "
            f"left out of WAUC and mean AUC: {details}."
        )
        if len(undefined) == self.num_domains:
            message += " No domain has an AUC, so WAUC is nan."
        rank_zero_warn(message, category=UserWarning)
