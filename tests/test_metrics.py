"""Known-answer tests for moe_mlora.metrics (exact AUC, grouped AUC, WAUC, DomainAUC, and
DomainAUC's binned bounded-memory mode against the exact values)."""

from __future__ import annotations

import math
import os
import socket
import warnings

import pytest
import torch

from moe_mlora.metrics import (
    DomainAUC,
    binary_auc,
    grouped_auc,
    histogram_auc,
    weighted_auc,
)
from moe_mlora.reporting.domain_table import format_domain_table

BOUND_KEYS = (
    "auc_error_bound",
    "wauc_error_bound",
    "mean_auc_error_bound",
    "overall_auc_error_bound",
)


def brute_force_auc(preds: torch.Tensor, target: torch.Tensor) -> float:
    """O(n^2) definition: P(score_pos > score_neg) + 1/2 P(tie) over all pos/neg pairs."""
    pos = preds[target == 1].double()
    neg = preds[target == 0].double()
    if pos.numel() == 0 or neg.numel() == 0:
        return math.nan
    # Compare rather than subtract: inf - inf would be nan.
    wins = (pos[:, None] > neg[None, :]).double().sum()
    wins += 0.5 * (pos[:, None] == neg[None, :]).double().sum()
    return float(wins / (pos.numel() * neg.numel()))


# --------------------------------------------------------------------------- binary_auc


def test_binary_auc_hand_computed():
    # pairs (pos, neg): (0.35, 0.1) win, (0.35, 0.4) loss, (0.8, *) 2 wins -> 3 / 4
    assert binary_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75


def test_binary_auc_perfect_and_inverted():
    target = torch.tensor([0, 0, 1, 1])
    assert binary_auc(torch.tensor([0.1, 0.2, 0.3, 0.4]), target) == 1.0
    assert binary_auc(torch.tensor([0.4, 0.3, 0.2, 0.1]), target) == 0.0


def test_binary_auc_all_tied_is_half():
    assert binary_auc(torch.full((6,), 0.3), torch.tensor([0, 1, 0, 1, 1, 0])) == 0.5


def test_binary_auc_tie_across_classes_counts_half():
    # pos {0.5, 0.9}, neg {0.5, 0.1}: (0.5,0.5) tie 1/2, (0.5,0.1) win, (0.9,*) 2 wins -> 3.5 / 4
    preds = torch.tensor([0.5, 0.5, 0.9, 0.1])
    target = torch.tensor([1, 0, 1, 0])
    assert binary_auc(preds, target) == 0.875


def test_binary_auc_accepts_float_and_bool_targets_and_logits():
    preds = torch.tensor([-2.0, 3.0, 0.5, 1.0])  # scores need not be probabilities here
    assert binary_auc(preds, torch.tensor([0.0, 1.0, 0.0, 1.0])) == 1.0
    assert binary_auc(preds, torch.tensor([False, True, False, True])) == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_auc_matches_brute_force_with_many_ties(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    preds = torch.round(torch.rand(500, generator=gen, dtype=dtype) * 20) / 20  # 21 values
    target = (torch.rand(500, generator=gen) < 0.3).long()
    assert binary_auc(preds, target) == pytest.approx(brute_force_auc(preds, target), abs=1e-12)


def test_binary_auc_single_class_or_empty_is_nan():
    assert math.isnan(binary_auc(torch.rand(5), torch.ones(5)))
    assert math.isnan(binary_auc(torch.rand(5), torch.zeros(5)))
    assert math.isnan(binary_auc(torch.zeros(0), torch.zeros(0)))


def test_binary_auc_rejects_non_binary_target():
    with pytest.raises(ValueError, match="0 and 1"):
        binary_auc(torch.rand(3), torch.tensor([0.0, 0.5, 1.0]))


# -------------------------------------------------------------------------- grouped_auc


def test_grouped_auc_matches_per_group_binary_auc():
    gen = torch.Generator().manual_seed(7)
    n, num_groups = 2000, 5
    preds = torch.round(torch.rand(n, generator=gen) * 50) / 50
    target = (torch.rand(n, generator=gen) < 0.25).long()
    group = torch.randint(0, 3, (n,), generator=gen)  # groups 0..2 mixed
    group[:40] = 3
    target[:40] = 1  # group 3: single class
    # group 4: no rows at all
    perm = torch.randperm(n, generator=gen)
    preds, target, group = preds[perm], target[perm], group[perm]

    auc, count = grouped_auc(preds, target, group, num_groups)
    assert auc.dtype == torch.float64 and count.dtype == torch.int64
    assert count.tolist() == [int((group == g).sum()) for g in range(num_groups)]
    for g in range(3):
        mask = group == g
        expected = brute_force_auc(preds[mask], target[mask])
        assert auc[g].item() == pytest.approx(expected, abs=1e-12)
        assert auc[g].item() == pytest.approx(binary_auc(preds[mask], target[mask]), abs=1e-12)
    assert math.isnan(auc[3]) and math.isnan(auc[4])
    assert count[4] == 0


def test_grouped_auc_ties_do_not_leak_across_groups():
    # Same score in two groups: ranks must be computed within each group only.
    preds = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.2, 0.9])
    target = torch.tensor([1, 0, 1, 0, 0, 1])
    group = torch.tensor([0, 0, 1, 1, 1, 1])
    auc, _ = grouped_auc(preds, target, group, 2)
    assert auc[0].item() == 0.5
    # group 1: pos {0.5, 0.9}, neg {0.5, 0.2} -> 3.5 / 4
    assert auc[1].item() == 0.875


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_grouped_auc_packed_key_path_equals_two_sort_path(dtype):
    """Low-precision scores use a packed int64 sort key; it must agree with the float64 path,
    including negative scores, -0.0 == +0.0 and infinities."""
    gen = torch.Generator().manual_seed(5)
    n = 4000
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), -1e-30, 1e-30])
    preds = torch.round(torch.randn(n, generator=gen) * 8) / 8
    preds[: 6 * 50] = special.repeat(50)
    preds = preds.to(dtype)
    target = torch.randint(0, 2, (n,), generator=gen)
    group = torch.randint(0, 7, (n,), generator=gen)
    fast, count_fast = grouped_auc(preds, target, group, 7)
    slow, count_slow = grouped_auc(preds.double(), target, group, 7)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-15)
    assert torch.equal(count_fast, count_slow)
    for g in range(7):
        mask = group == g
        assert fast[g].item() == pytest.approx(
            brute_force_auc(preds[mask].double(), target[mask]), abs=1e-12
        )


def test_grouped_auc_rejects_nan_scores():
    with pytest.raises(ValueError, match="nan"):
        grouped_auc(torch.tensor([0.1, math.nan]), torch.tensor([0, 1]), torch.tensor([0, 0]), 1)


def test_grouped_auc_rejects_bad_group_id():
    with pytest.raises(ValueError, match="group id 2"):
        grouped_auc(torch.rand(3), torch.tensor([0, 1, 0]), torch.tensor([0, 1, 2]), 2)


def test_grouped_auc_is_fast_on_a_million_rows():
    gen = torch.Generator().manual_seed(0)
    n = 1_000_000
    preds = torch.rand(n, generator=gen)
    target = (torch.rand(n, generator=gen) < preds).long()  # informative scores
    group = torch.randint(0, 300, (n,), generator=gen)
    auc, count = grouped_auc(preds, target, group, 300)
    assert int(count.sum()) == n
    # P(pos score > neg score) with target ~ Bernoulli(score), score ~ U(0,1) is 5/6 * ... ≈ 0.833
    assert torch.all((auc > 0.75) & (auc < 0.92))


# ------------------------------------------------------------------------- weighted_auc


def test_weighted_auc_skips_undefined():
    auc = torch.tensor([1.0, 0.5, math.nan], dtype=torch.float64)
    count = torch.tensor([4, 2, 100])
    assert weighted_auc(auc, count) == pytest.approx((4 * 1.0 + 2 * 0.5) / 6)
    assert math.isnan(weighted_auc(torch.full((2,), math.nan), torch.tensor([3, 3])))


# ---------------------------------------------------------------------------- DomainAUC


def two_domain_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Domain 0: AUC 1.0 on 4 rows; domain 1: AUC 0.5 on 2 rows (tied scores)."""
    preds = torch.tensor([0.1, 0.2, 0.8, 0.9, 0.4, 0.4])
    target = torch.tensor([0, 0, 1, 1, 0, 1])
    domain = torch.tensor([0, 0, 0, 0, 1, 1])
    return preds, target, domain


def test_domain_auc_known_wauc():
    metric = DomainAUC(2, domain_names=["a", "b"])
    metric.update(*two_domain_batch())
    result = metric.compute()
    assert result["wauc"] == pytest.approx((4 * 1.0 + 2 * 0.5) / 6)
    assert result["mean_auc"] == pytest.approx(0.75)
    assert result["auc_per_domain"].tolist() == [1.0, 0.5]
    assert result["count_per_domain"].tolist() == [4, 2]
    assert result["positives_per_domain"].tolist() == [2, 1]
    assert result["count_per_domain"].dtype == torch.int64
    assert result["auc_per_domain"].dtype == torch.float64
    assert result["undefined_domains"] == []
    preds, target, _ = two_domain_batch()
    assert result["auc"] == pytest.approx(brute_force_auc(preds, target))


def test_domain_auc_single_class_domain_is_nan_excluded_and_warns():
    preds, target, domain = two_domain_batch()
    # domain 2 ("c") has 50 rows, all positive: no AUC, must not weigh in.
    preds = torch.cat([preds, torch.full((50,), 0.7)])
    target = torch.cat([target, torch.ones(50, dtype=torch.long)])
    domain = torch.cat([domain, torch.full((50,), 2)])
    metric = DomainAUC(4, domain_names=["a", "b", "c", "d"])  # "d": no samples at all
    metric.update(preds, target, domain)
    with pytest.warns(UserWarning, match=r"c \(n=50, positives=50\).*d \(n=0"):
        result = metric.compute()
    assert math.isnan(result["auc_per_domain"][2]) and math.isnan(result["auc_per_domain"][3])
    assert result["wauc"] == pytest.approx(5 / 6)
    assert result["mean_auc"] == pytest.approx(0.75)
    assert result["undefined_domains"] == ["c", "d"]
    assert result["count_per_domain"].tolist() == [4, 2, 50, 0]


def test_domain_auc_no_defined_domain_gives_nan_wauc_not_crash():
    metric = DomainAUC(2)
    metric.update(torch.tensor([0.2, 0.3, 0.6]), torch.tensor([1, 1, 0]), torch.tensor([0, 0, 1]))
    with pytest.warns(UserWarning, match="WAUC is nan"):
        result = metric.compute()
    assert math.isnan(result["wauc"]) and math.isnan(result["mean_auc"])
    assert result["undefined_domains"] == ["0", "1"]
    assert result["auc"] == 0.0  # overall AUC is still defined


def test_domain_auc_compute_without_update_is_nan():
    metric = DomainAUC(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics' "compute before update" + ours
        result = metric.compute()
    assert math.isnan(result["wauc"]) and math.isnan(result["logloss"])
    assert result["count_per_domain"].tolist() == [0, 0, 0]


def random_rows(n: int = 3000, num_domains: int = 6, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    preds = torch.round(torch.rand(n, generator=gen) * 100) / 100
    target = (torch.rand(n, generator=gen) < 0.2 + 0.6 * preds).long()
    domain = torch.randint(0, num_domains, (n,), generator=gen)
    return preds, target, domain


def assert_results_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in ("wauc", "mean_auc", "auc", "logloss"):
        assert a[key] == pytest.approx(b[key], abs=1e-12, nan_ok=True)
    torch.testing.assert_close(a["auc_per_domain"], b["auc_per_domain"], equal_nan=True)
    assert torch.equal(a["count_per_domain"], b["count_per_domain"])
    assert torch.equal(a["positives_per_domain"], b["positives_per_domain"])
    assert a["undefined_domains"] == b["undefined_domains"]
    for key in BOUND_KEYS:  # binned mode only
        if key in a:
            torch.testing.assert_close(
                torch.as_tensor(a[key]), torch.as_tensor(b[key]), equal_nan=True
            )


def test_domain_auc_batches_equal_one_batch_and_match_functional():
    preds, target, domain = random_rows()
    one = DomainAUC(6)
    one.update(preds, target, domain)
    many = DomainAUC(6)
    for chunk in zip(preds.split(257), target.split(257), domain.split(257), strict=True):
        many.update(*chunk)
    r_one, r_many = one.compute(), many.compute()
    assert_results_equal(r_one, r_many)
    expected_auc, expected_count = grouped_auc(preds, target, domain, 6)
    torch.testing.assert_close(r_one["auc_per_domain"], expected_auc)
    assert r_one["wauc"] == pytest.approx(weighted_auc(expected_auc, expected_count))
    assert r_one["auc"] == pytest.approx(brute_force_auc(preds, target), abs=1e-12)


@pytest.mark.parametrize("bins", [None, 8])
def test_domain_auc_logloss_equals_torch_bce(bins):
    preds = torch.tensor([0.0, 0.3, 0.9, 1.0, 0.5])  # 0 and 1 exercise the clamp
    target = torch.tensor([0, 1, 1, 0, 1])
    metric = DomainAUC(1, bins=bins)
    metric.update(preds, target, torch.zeros(5, dtype=torch.long))
    expected = torch.nn.functional.binary_cross_entropy(
        preds.double().clamp(1e-7, 1 - 1e-7), target.double()
    )
    assert metric.compute()["logloss"] == pytest.approx(float(expected), rel=1e-12)


def test_domain_auc_reset():
    metric = DomainAUC(2)
    metric.update(torch.tensor([0.9, 0.1]), torch.tensor([1, 0]), torch.tensor([0, 0]))
    with pytest.warns(UserWarning, match="1 \\(n=0"):
        metric.compute()
    metric.reset()
    metric.update(*two_domain_batch())
    result = metric.compute()
    assert result["count_per_domain"].tolist() == [4, 2]
    assert result["wauc"] == pytest.approx(5 / 6)


@pytest.mark.parametrize(
    ("preds", "target", "domain", "match"),
    [
        ([0.1, 0.2], [0, 1], [0, 2], "domain id 2 out of range: expected 0..1"),
        ([0.1, 0.2], [0, 1], [-1, 0], "domain id -1"),
        ([0.1, 0.2], [0, 1], [0], "same shape"),
        ([0.1, 1.5], [0, 1], [0, 1], r"\[0, 1\]"),
        ([0.1, math.nan], [0, 1], [0, 1], r"\[0, 1\]"),
        ([0.1, 0.2], [0, 2], [0, 1], "0 and 1"),
    ],
)
@pytest.mark.parametrize("bins", [None, 16])
def test_domain_auc_rejects_bad_input(preds, target, domain, match, bins):
    metric = DomainAUC(2, bins=bins)
    with pytest.raises(ValueError, match=match):
        metric.update(torch.tensor(preds), torch.tensor(target), torch.tensor(domain))


@pytest.mark.parametrize("bins", [None, 16])
def test_domain_auc_rejects_2d_input(bins):
    metric = DomainAUC(2, bins=bins)
    with pytest.raises(ValueError, match="1-D"):
        metric.update(torch.rand(4, 1), torch.zeros(4, 1), torch.zeros(4, 1, dtype=torch.long))


def test_domain_auc_rejects_wrong_number_of_names():
    with pytest.raises(ValueError, match="domain_names"):
        DomainAUC(3, domain_names=["a", "b"])


# ------------------------------------------------------------------------ cross-process


def test_domain_auc_merged_shards_equal_single_metric():
    """Two processes' disjoint shards, merged as the DDP sync would, equal one metric."""
    preds, target, domain = random_rows(seed=11)
    single = DomainAUC(6)
    single.update(preds, target, domain)

    half = preds.numel() // 2
    shard_a, shard_b = DomainAUC(6), DomainAUC(6)
    shard_a.update(preds[:half], target[:half], domain[:half])
    shard_b.update(preds[half:], target[half:], domain[half:])
    shard_a.merge_state(shard_b)
    assert_results_equal(shard_a.compute(), single.compute())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_path: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        preds, target, domain = random_rows(seed=11)
        # Uneven shards on purpose: the gather must cope with different lengths; and a
        # shard with no rows at all (a rank that saw no batch) must not break the sync.
        cut = preds.numel() // 3
        for bins in (None, 16):  # exact (cat of CPU rows) and binned (sum of histograms)
            for name, sl in (
                ("uneven", slice(0, cut) if rank == 0 else slice(cut, None)),
                ("empty_rank", slice(0, None) if rank == 0 else slice(0, 0)),
            ):
                metric = DomainAUC(6, bins=bins)
                if sl.stop != 0:
                    metric.update(preds[sl], target[sl], domain[sl])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "compute before update" on the empty rank
                    result = metric.compute()
                torch.save(result, f"{out_path}.{name}.{bins}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_domain_auc_real_two_process_gloo(tmp_path):
    """Real DDP sync (gloo, 2 spawned processes): every rank gets the single-process answer."""
    import torch.multiprocessing as mp

    out_path = str(tmp_path / "result")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out_path), nprocs=2, join=True)
    preds, target, domain = random_rows(seed=11)
    for bins in (None, 16):
        single = DomainAUC(6, bins=bins)
        single.update(preds, target, domain)
        expected = single.compute()
        for name in ("uneven", "empty_rank"):
            for rank in range(2):
                result = torch.load(f"{out_path}.{name}.{bins}.{rank}", weights_only=False)
                assert_results_equal(result, expected)


# ------------------------------------------------------------------- exact mode: memory


def stored_devices(metric: DomainAUC) -> set[str]:
    return {t.device.type for name in ("preds", "target", "domain") for t in getattr(metric, name)}


def test_domain_auc_exact_rows_are_stored_on_cpu_and_stay_there():
    metric = DomainAUC(2)
    metric.update(*two_domain_batch())
    assert stored_devices(metric) == {"cpu"}
    # Moving the metric (as Lightning does) must not move the stored rows with it.
    metric.to("meta")
    assert metric.device.type == "meta"
    assert stored_devices(metric) == {"cpu"}
    assert metric.compute()["wauc"] == pytest.approx(5 / 6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bins", [None, 64])
def test_domain_auc_cuda_input_keeps_rows_on_cpu(bins):
    preds, target, domain = random_rows()
    on_cpu = DomainAUC(6, bins=bins)
    on_cpu.update(preds, target, domain)
    on_gpu = DomainAUC(6, bins=bins).to("cuda")
    for chunk in zip(preds.split(500), target.split(500), domain.split(500), strict=True):
        on_gpu.update(*(t.cuda() for t in chunk))
    if bins is None:
        assert stored_devices(on_gpu) == {"cpu"}
    else:  # O(D * B) histograms may live on the device
        assert on_gpu.pos_hist.device.type == "cuda"
    result = on_gpu.compute()
    assert result["auc_per_domain"].device.type == "cpu"
    assert_results_equal(result, on_cpu.compute())


def test_domain_auc_exact_sync_gathers_and_returns_cpu_rows():
    """The exact mode's sync wrapper (gather on a backend-capable device, rows back to the
    CPU), driven by a fake all_gather that plays two ranks holding the same shard."""
    preds, target, domain = random_rows(seed=5)
    metric = DomainAUC(6)
    metric.update(preds, target, domain)
    seen: list[str] = []

    def fake_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
        seen.append(tensor.device.type)
        return [tensor.clone(), tensor.clone()]

    metric._sync_dist(fake_gather)
    assert set(seen) == {"cpu"} and len(seen) == 3
    assert all(getattr(metric, name).device.type == "cpu" for name in ("preds", "target", "domain"))
    twice = DomainAUC(6)
    twice.update(preds, target, domain)
    twice.update(preds, target, domain)
    assert_results_equal(metric.compute(), twice.compute())


# ---------------------------------------------------------------------- binned mode


def ctr_rows(n: int, num_domains: int, seed: int, levels: int | None = None):
    """Informative scores with a different score/label relation per domain; ``levels``
    rounds the scores to that many values, so that exact ties occur."""
    gen = torch.Generator().manual_seed(seed)
    domain = torch.randint(0, num_domains, (n,), generator=gen)
    preds = torch.rand(n, generator=gen) ** (1 + domain.float() / 2)
    if levels is not None:
        preds = torch.round(preds * (levels - 1)) / (levels - 1)
    slope = 0.3 + 0.1 * domain.float()
    target = (torch.rand(n, generator=gen) < 0.05 + slope * preds).long()
    return preds, target, domain


@pytest.mark.parametrize(
    ("n", "bins", "levels", "max_bound"),
    [
        (200_000, 4096, None, 1e-3),  # continuous scores, fine bins: tiny bound
        (20_000, 7, 101, None),  # tied scores, coarse bins not aligned with them: loose bound
    ],
)
def test_binned_auc_is_within_its_bound_of_the_exact_auc(n, bins, levels, max_bound):
    preds, target, domain = ctr_rows(n, 5, seed=1, levels=levels)
    exact, binned = DomainAUC(5), DomainAUC(5, bins=bins)
    for chunk in zip(preds.split(8192), target.split(8192), domain.split(8192), strict=True):
        exact.update(*chunk)
        binned.update(*chunk)
    e, b = exact.compute(), binned.compute()
    slack = 1e-12  # float64 rounding only

    bound = b["auc_error_bound"]
    assert bound.dtype == torch.float64 and bound.shape == (5,)
    assert torch.all((b["auc_per_domain"] - e["auc_per_domain"]).abs() <= bound + slack)
    assert abs(b["wauc"] - e["wauc"]) <= b["wauc_error_bound"] + slack
    assert abs(b["mean_auc"] - e["mean_auc"]) <= b["mean_auc_error_bound"] + slack
    assert abs(b["auc"] - e["auc"]) <= b["overall_auc_error_bound"] + slack
    if max_bound is not None:
        assert float(bound.max()) < max_bound and b["wauc_error_bound"] < max_bound
    else:  # coarse bins: the estimate really is off, and the bound covers it
        assert float((b["auc_per_domain"] - e["auc_per_domain"]).abs().max()) > 1e-3
    # WAUC's bound uses WAUC's weights.
    assert b["wauc_error_bound"] == pytest.approx(weighted_auc(bound, e["count_per_domain"]))
    # Everything that is not an AUC is exact.
    assert torch.equal(b["count_per_domain"], e["count_per_domain"])
    assert torch.equal(b["positives_per_domain"], e["positives_per_domain"])
    assert b["undefined_domains"] == e["undefined_domains"] == []
    assert b["logloss"] == pytest.approx(e["logloss"], rel=1e-9)
    assert set(b) == set(e) | set(BOUND_KEYS)


def test_binned_auc_hand_computed():
    """Two bins [0, .5) and [.5, 1].

    Domain 0: positives 0.3 | 0.8, negatives 0.1 | 0.6 (one of each per bin). Exact AUC 3/4;
    binned: 1 pair across bins (won) + 2 pairs sharing a bin (1/2 each) = 2/4, bound 2/(2*4).
    Domain 1: positive 0.9, negative 0.2: different bins, AUC 1 exactly, bound 0.
    Overall: positives [1, 2], negatives [2, 1] per bin: 2*2 won + (1*2 + 2*1)/2 = 6 of 9
    pairs, bound 4/18; the exact overall AUC is 8/9, so the bound is attained.
    """
    preds = torch.tensor([0.3, 0.8, 0.1, 0.6, 0.9, 0.2])
    target = torch.tensor([1, 1, 0, 0, 1, 0])
    domain = torch.tensor([0, 0, 0, 0, 1, 1])
    metric = DomainAUC(2, domain_names=["a", "b"], bins=2)
    metric.update(preds, target, domain)
    result = metric.compute()
    assert metric.pos_hist.tolist() == [[1, 1], [0, 1]]
    assert metric.neg_hist.tolist() == [[1, 1], [1, 0]]
    assert result["auc_per_domain"].tolist() == [0.5, 1.0]
    assert result["auc_error_bound"].tolist() == [0.25, 0.0]
    assert result["wauc"] == pytest.approx((4 * 0.5 + 2 * 1.0) / 6)
    assert result["wauc_error_bound"] == pytest.approx(4 * 0.25 / 6)
    assert result["mean_auc"] == pytest.approx(0.75)
    assert result["mean_auc_error_bound"] == pytest.approx(0.125)
    assert result["auc"] == pytest.approx(6 / 9)
    assert result["overall_auc_error_bound"] == pytest.approx(2 / 9)
    assert binary_auc(preds, target) == pytest.approx(6 / 9 + 2 / 9)
    assert result["count_per_domain"].tolist() == [4, 2]
    assert result["positives_per_domain"].tolist() == [2, 1]


def test_binned_bin_edges():
    """Bin floor(p * B): an edge belongs to the bin above it; p = 1 joins the last bin."""
    below_half = torch.tensor(0.5).nextafter(torch.tensor(0.0))
    preds = torch.tensor([0.0, 0.25, 0.5, 1.0, float(below_half), 0.75])
    metric = DomainAUC(1, bins=4)
    metric.update(preds, torch.ones(6, dtype=torch.long), torch.zeros(6, dtype=torch.long))
    assert metric.pos_hist.tolist() == [[1, 2, 1, 2]]
    assert metric.neg_hist.sum() == 0


def test_binned_bound_is_zero_and_auc_exact_when_no_bin_holds_both_classes():
    # Classes interleave across bins (so the AUC is not 1) but never share one.
    bins = 10
    gen = torch.Generator().manual_seed(0)
    bin_of_row = torch.randint(0, bins, (3000,), generator=gen)
    preds = (bin_of_row.float() + torch.rand(3000, generator=gen) * 0.9) / bins
    target = (bin_of_row % 2 == 1).long()  # odd bins positive, even bins negative
    domain = torch.randint(0, 3, (3000,), generator=gen)
    metric = DomainAUC(3, bins=bins)
    metric.update(preds, target, domain)
    result = metric.compute()
    assert result["auc_error_bound"].tolist() == [0.0, 0.0, 0.0]
    assert result["wauc_error_bound"] == 0.0 and result["overall_auc_error_bound"] == 0.0
    expected, _ = grouped_auc(preds, target, domain, 3)
    torch.testing.assert_close(result["auc_per_domain"], expected, rtol=0, atol=1e-15)
    assert 0.5 < float(expected.min()) < 0.99


def test_histogram_auc_functional():
    pos = torch.tensor([[0, 3, 1], [2, 0, 0], [0, 0, 0]])
    neg = torch.tensor([[2, 1, 0], [0, 0, 5], [1, 1, 1]])
    auc, bound = histogram_auc(pos, neg)
    # Group 0: pairs 4 * 3 = 12; won 3*2 + 1*3 = 9, tied 3*1 = 3 -> (9 + 1.5) / 12.
    assert auc[0].item() == pytest.approx(10.5 / 12) and bound[0].item() == pytest.approx(3 / 24)
    assert auc[1].item() == 0.0 and bound[1].item() == 0.0
    assert math.isnan(auc[2]) and math.isnan(bound[2])  # no positives
    with pytest.raises(ValueError, match="same shape"):
        histogram_auc(pos, neg[:, :2])


def test_binned_state_size_does_not_grow_with_rows():
    metric = DomainAUC(5, bins=256)

    def state_numel() -> int:
        return sum(t.numel() for t in metric.metric_state.values())

    before = state_numel()
    assert before == 2 * 5 * 256 + 1  # two [D, B] histograms and the log-loss sum
    for seed in range(10):
        metric.update(*ctr_rows(5000, 5, seed=seed))
    assert state_numel() == before
    assert int(metric.pos_hist.sum() + metric.neg_hist.sum()) == 50_000
    metric.reset()
    assert int(metric.pos_hist.sum() + metric.neg_hist.sum()) == 0 and metric.bce_sum == 0


def test_binned_merged_shards_equal_single_metric():
    """Sum-reduced histograms: two shards merged (as the DDP sync would) equal one metric."""
    preds, target, domain = ctr_rows(30_000, 5, seed=2)
    single = DomainAUC(5, bins=512)
    single.update(preds, target, domain)
    half = 12_345
    shard_a, shard_b = DomainAUC(5, bins=512), DomainAUC(5, bins=512)
    shard_a.update(preds[:half], target[:half], domain[:half])
    shard_b.update(preds[half:], target[half:], domain[half:])
    shard_a.merge_state(shard_b)
    assert torch.equal(shard_a.pos_hist, single.pos_hist)
    assert torch.equal(shard_a.neg_hist, single.neg_hist)
    merged, expected = shard_a.compute(), single.compute()
    assert merged["logloss"] == pytest.approx(expected["logloss"], rel=1e-12)
    merged["logloss"] = expected["logloss"]  # summation order differs, values agree
    assert_results_equal(merged, expected)


def test_binned_forward_accumulates_like_update():
    preds, target, domain = ctr_rows(4000, 3, seed=4)
    by_forward, by_update = DomainAUC(3, bins=64), DomainAUC(3, bins=64)
    for chunk in zip(preds.split(1000), target.split(1000), domain.split(1000), strict=True):
        batch_result = by_forward(*chunk)
        assert "auc_error_bound" in batch_result
        by_update.update(*chunk)
    assert torch.equal(by_forward.pos_hist, by_update.pos_hist)
    assert torch.equal(by_forward.neg_hist, by_update.neg_hist)


def test_binned_single_class_and_empty_domains_are_nan_and_warn():
    preds, target, domain = two_domain_batch()
    preds = torch.cat([preds, torch.full((50,), 0.7)])
    target = torch.cat([target, torch.ones(50, dtype=torch.long)])
    domain = torch.cat([domain, torch.full((50,), 2)])
    metric = DomainAUC(4, domain_names=["a", "b", "c", "d"], bins=16)
    metric.update(preds, target, domain)
    with pytest.warns(UserWarning, match=r"c \(n=50, positives=50\).*d \(n=0"):
        result = metric.compute()
    assert result["undefined_domains"] == ["c", "d"]
    for key in ("auc_per_domain", "auc_error_bound"):
        assert math.isnan(result[key][2]) and math.isnan(result[key][3])
    assert result["count_per_domain"].tolist() == [4, 2, 50, 0]
    # a: 0.1, 0.2 | 0.8, 0.9 in distinct bins -> exact 1; b: a tie in one bin -> 0.5, bound 0.5
    assert result["auc_per_domain"][:2].tolist() == [1.0, 0.5]
    assert result["auc_error_bound"][:2].tolist() == [0.0, 0.5]
    assert result["wauc"] == pytest.approx(5 / 6)
    assert result["wauc_error_bound"] == pytest.approx(2 * 0.5 / 6)


def test_binned_compute_without_update_is_nan():
    metric = DomainAUC(3, bins=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics' "compute before update" + ours
        result = metric.compute()
    for key in ("wauc", "mean_auc", "auc", "logloss", "wauc_error_bound"):
        assert math.isnan(result[key])
    assert result["count_per_domain"].tolist() == [0, 0, 0]


@pytest.mark.parametrize("bins", [None, 16])
def test_domain_auc_states_keep_their_dtypes_under_module_casts(bins):
    """``LightningModule.to(torch.bfloat16)`` (bf16-true precision) reaches the metric: it
    must not round the float64 log-loss sum or the counts, nor the rows' common dtype."""
    preds, target, domain = ctr_rows(3000, 3, seed=6)
    reference = DomainAUC(3, bins=bins)
    reference.update(preds, target, domain)
    cast = DomainAUC(3, bins=bins).to(torch.bfloat16)
    cast.set_dtype(torch.float16)
    cast.update(preds, target, domain)
    assert cast.dtype == torch.float32
    if bins is not None:
        assert cast.bce_sum.dtype == torch.float64 and cast.pos_hist.dtype == torch.int64
    assert_results_equal(cast.compute(), reference.compute())


@pytest.mark.parametrize("bins", [0, 1, -4, 2.5, "64", True])
def test_domain_auc_rejects_bad_bins(bins):
    with pytest.raises(ValueError, match="bins"):
        DomainAUC(2, bins=bins)


def test_domain_auc_two_bins_is_the_minimum():
    assert DomainAUC(2, bins=2).bins == 2
    assert DomainAUC(2).bins is None


# ------------------------------------------------------------------------------- table


def test_format_domain_table():
    preds, target, domain = two_domain_batch()
    metric = DomainAUC(3, domain_names=["male", "female", "other"])
    metric.update(preds, target, domain)
    with pytest.warns(UserWarning):
        result = metric.compute()
    table = format_domain_table(result, ["male", "female", "other"])
    lines = table.splitlines()
    assert lines[0].split() == ["domain", "samples", "pos_rate", "AUC"]
    male = next(line for line in lines if line.startswith("male"))
    assert male.split() == ["male", "4", "0.5000", "1.0000"]
    other = next(line for line in lines if line.startswith("other"))
    assert other.split() == ["other", "0", "-", "undefined"]
    assert any(line.startswith("WAUC") and line.split()[-1] == "0.8333" for line in lines)
    assert len({len(line) for line in lines}) == 1  # fixed width
    # Without names it falls back to ids.
    assert format_domain_table(result, None).splitlines()[2].startswith("0 ")
