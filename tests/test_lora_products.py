"""Stacked LoRA experts: the rows path equals the dense path, old weights load, Adam per expert."""

from __future__ import annotations

import pytest
import torch

from moe_mlora.data.processed import FieldSpec
from moe_mlora.models import AdapterConfig, build_model
from moe_mlora.models.lora import ExpertRows
from moe_mlora.training.optim import make_adam

DOMAINS = 5
FIELDS = [FieldSpec("user", 40), FieldSpec("item", 30), FieldSpec("domain", DOMAINS)]


def batch(domains: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    domain = torch.tensor(domains, dtype=torch.long)
    sparse = torch.stack(
        [torch.randint(0, f.vocab_size, (len(domains),), generator=g) for f in FIELDS[:2]]
        + [domain],
        dim=1,
    )
    return sparse, domain


UNEVEN = [0] * 9 + [1] * 2 + [3] * 5 + [4]  # domain 2 absent, one row of domain 4
SHUFFLED = [
    UNEVEN[i] for i in torch.randperm(len(UNEVEN), generator=torch.Generator().manual_seed(3))
]


def twin_models(kind: str, experts: int | None = None, **gate) -> tuple:
    """The same model twice (same weights), once per product path, adapters nonzero."""
    models = []
    for products in ("dense", "rows"):
        torch.manual_seed(0)
        config = AdapterConfig(
            kind=kind, experts=experts, products=products, gate=gate, lora_reduce=4
        )
        model = build_model("deepfm", FIELDS, DOMAINS, config, hidden_units=(16, 8), dropout=0.0)
        with torch.no_grad():
            torch.manual_seed(1)
            for p in model.expert_parameters():
                p.normal_(0.0, 0.3)
        models.append(model)
    return models


def outputs_and_grads(model, sparse, domain, expert=None) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    logits = model(sparse, domain, expert)
    (logits * torch.linspace(-1, 1, len(logits))).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize(
    "rows", [UNEVEN, SHUFFLED, [3], [1] * 6], ids=["uneven", "shuffled", "one row", "one domain"]
)
@pytest.mark.parametrize(
    ("kind", "routing", "experts", "gate"),
    [
        ("mlora", "domain", None, {}),
        ("moe", "domain", 7, {}),
        ("moe", "expert", 6, {}),
        ("moe", "mixture", 6, {"top_k": 2}),
        ("moe", "mixture", 6, {"top_k": 3, "input": "domain_features"}),
    ],
    ids=["mlora", "moe domain", "moe expert", "top-2", "top-3 features"],
)
def test_rows_path_equals_dense_path(kind, routing, experts, gate, rows) -> None:
    dense, by_rows = twin_models(kind, experts, **gate)
    sparse, domain = batch(rows)
    expert = (domain * 2 + 1) % 6 if routing == "expert" else None
    results = []
    for model in (dense, by_rows):
        model.routing = routing
        results.append(outputs_and_grads(model, sparse, domain, expert))
    (dense_out, dense_grads), (rows_out, rows_grads) = results
    torch.testing.assert_close(rows_out, dense_out, rtol=1e-5, atol=1e-6)
    assert rows_grads.keys() == dense_grads.keys()
    for name, grad in dense_grads.items():
        torch.testing.assert_close(rows_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("kind", "routing", "experts", "gate"),
    [("mlora", "domain", None, {}), ("moe", "mixture", 6, {"top_k": 2})],
    ids=["mlora", "top-2"],
)
def test_rows_path_trains_under_bf16_autocast_as_the_dense_path(kind, routing, experts, gate):
    dense, by_rows = twin_models(kind, experts, **gate)
    sparse, domain = batch(SHUFFLED)
    results = []
    for model in (dense, by_rows):
        model.routing = routing
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(outputs_and_grads(model, sparse, domain))
    (dense_out, dense_grads), (rows_out, rows_grads) = results
    torch.testing.assert_close(rows_out, dense_out, rtol=0.05, atol=0.05)
    for name, grad in dense_grads.items():
        assert torch.isfinite(rows_grads[name]).all(), name
        torch.testing.assert_close(rows_grads[name], grad, rtol=0.05, atol=0.05, msg=name)


def test_auto_takes_the_rows_path_from_the_measured_expert_count() -> None:
    x = torch.zeros(2, 3)
    few = build_model("mlp", FIELDS, DOMAINS, AdapterConfig(kind="mlora")).tower.adapter
    many = build_model("mlp", FIELDS, 8, AdapterConfig(kind="mlora")).tower.adapter
    assert not few.rows_path(x) and many.rows_path(x) and not many.rows_path(x, top_k=True)
    for products, expected in (("dense", False), ("rows", True)):
        config = AdapterConfig(kind="mlora", products=products)
        assert build_model("mlp", FIELDS, 2, config).tower.adapter.rows_path(x) == expected
    anchored = AdapterConfig(kind="moe", experts=6, gate={"top_k": 2, "anchored": True})
    adapter = build_model("mlp", FIELDS, DOMAINS, anchored).tower.adapter
    assert adapter.sparse_top_k() is None  # an anchored row may use more than k experts


def test_a_traced_model_uses_the_dense_path_and_follows_any_domain_mix() -> None:
    model = twin_models("mlora")[1].eval()
    sparse, domain = batch(UNEVEN)
    traced = torch.jit.trace(model, (sparse, domain), check_trace=False)
    other_sparse, other_domain = batch([2, 2, 4, 0, 1, 1, 1, 3], seed=5)
    with torch.no_grad():
        torch.testing.assert_close(
            traced(other_sparse, other_domain), model(other_sparse, other_domain)
        )


def test_expert_rows_give_each_pair_its_own_slot_in_a_tile_of_its_expert() -> None:
    expert = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 3]])
    rows = ExpertRows(expert, 6, torch.full((4, 2), 0.5))
    assert rows.num_tiles == 4  # experts 4 and 5 have no rows: no tile
    assert len(set(rows.slot.tolist())) == 8
    assert torch.equal(rows.tile_expert[rows.slot // rows.tile_rows], expert.reshape(-1))
    assert torch.equal(rows.source[rows.slot], torch.arange(8) // 2)  # each pair reads its row
    even = ExpertRows(torch.tensor([1, 0, 1, 0, 2, 2]), 3)
    assert even.tile_expert is None and even.num_tiles == 3 and even.tile_rows == 2
    assert torch.equal(even.slot // 2, torch.tensor([1, 0, 1, 0, 2, 2]))
    with pytest.raises(ValueError, match="one shape"):
        ExpertRows(expert, 6, torch.ones(4))


def test_an_empty_batch_goes_through_the_rows_path() -> None:
    model = twin_models("mlora")[1]
    sparse, domain = batch([])
    assert model(sparse, domain).shape == (0,)


def test_uneven_experts_are_tiled_so_padding_stays_below_a_tile_per_expert() -> None:
    expert = torch.tensor([0] * 100 + [1] + [3] * 3)
    rows = ExpertRows(expert, 64)
    assert rows.tile_rows == 35  # 104 rows over 3 used experts
    assert rows.tile_expert.tolist() == [0, 0, 0, 1, 3]
    assert rows.num_tiles * rows.tile_rows < len(expert) + 3 * rows.tile_rows


def test_weights_saved_with_one_tensor_per_expert_still_load() -> None:
    model = twin_models("mlora")[0]
    old_format = {}
    for key, value in model.state_dict().items():
        if ".lora." in key:
            old_format.update({f"{key}.{e}": value[e].clone() for e in range(value.shape[0])})
        else:
            old_format[key] = value
    fresh = build_model("deepfm", FIELDS, DOMAINS, model.adapter_config, hidden_units=(16, 8))
    fresh.load_state_dict(old_format)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_expert_adam_is_torch_adam_per_expert_with_absent_experts_skipped() -> None:
    """Stacked [E, ...] tensors updated as E separate tensors by torch's Adam, where an
    expert absent from a step has grad None (torch's Adam then skips it entirely)."""
    experts, shape = 4, (3, 5)
    torch.manual_seed(0)
    start = torch.randn(experts, *shape)
    stacked = torch.nn.Parameter(start.clone())
    shared = torch.nn.Parameter(torch.randn(6))
    separate = [torch.nn.Parameter(start[e].clone()) for e in range(experts)]
    shared_twin = torch.nn.Parameter(shared.detach().clone())
    absent: frozenset[int] = frozenset()
    ours = make_adam([shared, stacked], 0.05, 0.01, [stacked], lambda: absent)
    theirs = torch.optim.Adam([shared_twin, *separate], lr=0.05, weight_decay=0.01, fused=True)
    skipped = [frozenset(), frozenset(), {1}, {1, 3}, frozenset(), {0, 1, 2, 3}, {2}, frozenset()]
    for step, skip in enumerate(skipped):
        absent = frozenset(skip)
        grad = torch.randn(experts, *shape, generator=torch.Generator().manual_seed(step))
        stacked.grad, shared.grad = grad.clone(), torch.full((6,), float(step))
        shared_twin.grad = shared.grad.clone()
        for e, p in enumerate(separate):
            p.grad = None if e in skip else grad[e].clone()
        ours.step()
        theirs.step()
        assert torch.equal(shared, shared_twin)
        for e, p in enumerate(separate):
            assert torch.equal(stacked[e], p), (step, e)
    state = ours.state[stacked]
    assert state["step"].tolist() == [7, 5, 6, 6]
    reloaded = make_adam([shared, stacked], 0.05, 0.01, [stacked])
    reloaded.load_state_dict(ours.state_dict())
    assert torch.equal(reloaded.state[stacked]["step"], state["step"])


def test_without_a_fused_cpu_kernel_adam_runs_unfused_with_the_same_update(monkeypatch) -> None:
    """Torch releases before 2.4 have no fused Adam on the CPU."""
    from moe_mlora.training import optim

    torch.manual_seed(0)
    start = torch.randn(4, 3)
    updated = []
    for fused in (True, False):
        monkeypatch.setattr(optim, "fused_adam_runs_on", lambda device, fused=fused: fused)
        stacked = torch.nn.Parameter(start.clone())
        adam = make_adam([stacked], 0.05, 0.01, [stacked])
        assert [group["fused"] for group in adam.param_groups] == [fused]
        for step in range(3):
            stacked.grad = torch.randn(4, 3, generator=torch.Generator().manual_seed(step))
            adam.step()
        updated.append(stacked.detach().clone())
    torch.testing.assert_close(updated[1], updated[0])


def test_products_must_be_a_known_path() -> None:
    with pytest.raises(ValueError, match="products must be one of"):
        AdapterConfig(kind="mlora", products="sparse")
