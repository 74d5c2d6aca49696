"""AUC in one vectorised pass: per group (domain) exactly, overall, weighted, and from histograms.

Exact AUC is the Mann-Whitney U statistic with average ranks (a tie between a positive and a
negative counts 1/2), computed for every group at once from one lexicographic sort by
``(group, score)`` and segment sums; :mod:`moe_mlora.metrics` builds the torchmetrics metric
on it, and the checks of its inputs are at the end of this module.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor


def check_binary_target(target: Tensor) -> None:
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
    check_binary_target(target)
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


def histogram_auc(positives: Tensor, negatives: Tensor) -> tuple[Tensor, Tensor]:
    """ROC AUC of every group from score histograms, with a bound on its error.

    Args:
        positives: positive counts per group and score bin, shape ``[G, B]``, bins ordered
            by increasing score (any numeric dtype).
        negatives: negative counts, same shape.

    Returns:
        ``(auc, error_bound)``, both float64 ``[G]``, ``nan`` where a group has no positive or
        no negative.

    A (positive, negative) pair in different bins counts 1 if the positive's bin is the
    higher one and 0 otherwise; a pair sharing a bin counts 1/2, as a tie. When the bin is a
    non-decreasing function of the score, a pair in different bins is counted exactly as the
    exact AUC counts it, and a pair sharing a bin is off by at most 1/2 (1/2 instead of 0, 1/2
    or 1). Hence ``|auc - exact AUC| <= error_bound = sum_b pos_b * neg_b / (2 * P * N)``
    with ``P``, ``N`` the group's positives and negatives: half the fraction of pairs that
    share a bin. It is 0 when no bin holds both classes. Sums are float64 (counts up to
    2^53 are exact; products are rounded to ~1e-16 relative).
    """
    if positives.shape != negatives.shape or positives.ndim != 2:
        raise ValueError(
            "positives and negatives must be 2-D [groups, bins] of the same shape, got "
            f"{tuple(positives.shape)} and {tuple(negatives.shape)}"
        )
    pos = positives.to(torch.float64)
    neg = negatives.to(torch.float64)
    neg_below = torch.cumsum(neg, dim=1) - neg  # negatives in strictly lower bins
    wins = (pos * neg_below).sum(dim=1)
    ties = (pos * neg).sum(dim=1)
    pairs = pos.sum(dim=1) * neg.sum(dim=1)
    defined = pairs > 0
    nan = torch.full_like(pairs, math.nan)
    safe_pairs = pairs.clamp_min(1)
    auc = torch.where(defined, (wins + 0.5 * ties) / safe_pairs, nan)
    error_bound = torch.where(defined, ties / (2 * safe_pairs), nan)
    return auc, error_bound


# ----------------------------------------------------------------------------- metric inputs


def check_bins(bins: int | None) -> int | None:
    """``bins`` as an int >= 2 (or ``None``); one bin would make every pair a tie."""
    if bins is None:
        return None
    if isinstance(bins, bool):
        raise ValueError(f"bins must be an integer >= 2 or None, got {bins!r}")
    try:
        value = operator.index(bins)
    except TypeError:
        raise ValueError(f"bins must be an integer >= 2 or None, got {bins!r}") from None
    if value < 2:
        raise ValueError(f"bins must be >= 2 (one bin makes every pair a tie), got {value}")
    return value


def check_metric_batch(preds: Tensor, target: Tensor, domain: Tensor, num_domains: int) -> None:
    """Raise ``ValueError`` unless the batch is 1-D probabilities, 0/1 labels and valid ids."""
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
    outside = ~((preds >= 0) & (preds <= 1))  # also catches nan
    if bool(outside.any()):
        bad = preds[outside][0].item()
        raise ValueError(f"preds must be probabilities in [0, 1] (apply sigmoid), found {bad}")
    check_binary_target(target)
    dmin, dmax = (int(v) for v in domain.aminmax())
    if dmin < 0 or dmax >= num_domains:
        bad = dmin if dmin < 0 else dmax
        raise ValueError(
            f"domain id {bad} out of range: expected 0..{num_domains - 1} "
            f"(num_domains={num_domains})"
        )
