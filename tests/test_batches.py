"""Index-slice batches, expert assignment and the phase-2 batch schedule."""

import pytest
import torch

from moe_mlora.data.batches import (
    ExpertBatches,
    ExpertEvalBatches,
    SplitBatches,
    expert_assignment,
)
from moe_mlora.data.processed import SplitTensors


def make_split(n: int = 1000, domains: int = 3, seed: int = 0) -> SplitTensors:
    g = torch.Generator().manual_seed(seed)
    return SplitTensors(
        sparse=torch.arange(n).unsqueeze(1).repeat(1, 2),
        domain=torch.randint(0, domains, (n,), generator=g),
        label=torch.randint(0, 2, (n,), generator=g).float(),
    )


def test_split_batches_cover_every_row_once_per_epoch():
    split = make_split(1000)
    loader = SplitBatches(split, batch_size=128, shuffle=True, seed=5)
    assert len(loader) == 8
    first = torch.cat([b["sparse"][:, 0] for b in loader])
    second = torch.cat([b["sparse"][:, 0] for b in loader])
    assert sorted(first.tolist()) == list(range(1000))
    assert not torch.equal(first, second), "each epoch must reshuffle"
    again = SplitBatches(split, batch_size=128, shuffle=True, seed=5)
    assert torch.equal(torch.cat([b["sparse"][:, 0] for b in again]), first), "seeded"


def test_split_batches_keep_rows_aligned():
    split = make_split(300)
    for batch in SplitBatches(split, batch_size=64, shuffle=True, seed=1):
        rows = batch["sparse"][:, 0]
        assert torch.equal(batch["domain"], split.domain[rows])
        assert torch.equal(batch["label"], split.label[rows])


def test_unshuffled_batches_are_in_order():
    split = make_split(300)
    rows = torch.cat([b["sparse"][:, 0] for b in SplitBatches(split, batch_size=100)])
    assert torch.equal(rows, torch.arange(300))


@pytest.mark.parametrize(
    ("experts", "domains", "expected"),
    [
        (2, 2, [[0], [1]]),  # E = D
        (6, 2, [[0], [1], [0], [1], [0], [1]]),  # E = 3D: three experts per domain
        (3, 7, [[0, 3, 6], [1, 4], [2, 5]]),  # E < D: expert e serves d mod E == e
        (1, 4, [[0, 1, 2, 3]]),
    ],
)
def test_expert_assignment(experts, domains, expected):
    assert expert_assignment(experts, domains) == expected


def test_expert_assignment_covers_every_domain_when_fewer_experts():
    for domains in range(1, 22):
        for experts in range(1, domains + 1):
            served = sorted(d for ds in expert_assignment(experts, domains) for d in ds)
            assert served == list(range(domains))


def test_expert_assignment_rejects_zero():
    with pytest.raises(ValueError, match="experts must be >= 1"):
        expert_assignment(0, 2)


def test_expert_batches_route_each_expert_its_own_domains():
    split = make_split(2000, domains=3)
    assignment = expert_assignment(2, 3)  # expert 0: domains 0, 2; expert 1: domain 1
    loader = ExpertBatches(split, assignment, batch_size=100, seed=3)
    seen = {0: [], 1: []}
    for batch in loader:
        for e in (0, 1):
            mine = batch["expert"] == e
            assert len(mine.nonzero()) <= 100
            assert set(batch["domain"][mine].tolist()) <= set(assignment[e])
            seen[e].append(batch["sparse"][mine, 0])
    for e in (0, 1):
        rows = torch.cat(seen[e])
        expected = torch.isin(split.domain, torch.tensor(assignment[e])).nonzero().flatten()
        assert sorted(rows.tolist()) == expected.tolist(), "one epoch = each of its rows once"


def test_expert_batches_alone_equal_the_parallel_slices():
    """The batches expert e sees in the parallel schedule are those it sees trained alone."""
    split = make_split(1500, domains=2)
    assignment = expert_assignment(4, 2)
    parallel = ExpertBatches(split, assignment, batch_size=128, seed=9)
    for epoch in range(2):
        epoch_batches = list(parallel)
        for expert in range(4):
            alone = ExpertBatches(split, assignment, batch_size=128, seed=9, active=[expert])
            alone.epoch = epoch
            mine = [b["sparse"][b["expert"] == expert, 0] for b in epoch_batches]
            mine = [m for m in mine if len(m)]
            theirs = [b["sparse"][:, 0] for b in alone]
            assert len(mine) == len(theirs)
            for a, b in zip(mine, theirs, strict=True):
                assert torch.equal(a, b)


def test_expert_batches_length_follows_active_experts():
    split = SplitTensors(
        sparse=torch.zeros(300, 1, dtype=torch.long),
        domain=torch.tensor([0] * 250 + [1] * 50),
        label=torch.zeros(300),
    )
    loader = ExpertBatches(split, [[0], [1]], batch_size=100)
    assert len(loader) == 3
    loader.active.discard(0)
    assert len(loader) == 1
    assert all(set(b["expert"].tolist()) == {1} for b in loader)


def test_expert_eval_batches_repeat_rows_per_serving_expert():
    split = make_split(500, domains=2)
    assignment = expert_assignment(4, 2)  # two experts per domain
    batches = list(ExpertEvalBatches(split, assignment, batch_size=300))
    experts = torch.cat([b["expert"] for b in batches])
    domains = torch.cat([b["domain"] for b in batches])
    assert len(experts) == 2 * 500
    for e, served in enumerate(assignment):
        assert set(domains[experts == e].tolist()) == set(served)
