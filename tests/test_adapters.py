"""Adapters: routing math against hand computation, ranks, parameter groups, gradients, configs."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from moe_mlora.data.processed import FieldSpec
from moe_mlora.models import AdapterConfig, CTRModel, build_model

NUM_DOMAINS = 3
FIELDS = [FieldSpec("user", 30), FieldSpec("item", 20), FieldSpec("domain", NUM_DOMAINS)]


def batch(n: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, f.vocab_size, (n,), generator=g) for f in FIELDS], 1)
    return sparse, sparse[:, 2].clone()


def randomise_adapters(model: CTRModel) -> None:
    """Give B_e and b_e nonzero values so that the experts matter."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.expert_parameters():
            p.normal_(0.0, 0.3)


def manual_mlp(model: CTRModel, sparse: Tensor, weights: Tensor) -> Tensor:
    """The MLP's logits in eval mode, with an explicit loop over samples' experts per layer.

    ``h = W x + b + sum_e w[e] (B_e A_e x + b_e)`` then ReLU; a deliberately
    naive reference for the batched implementation.
    """
    x = model.embeddings(sparse).flatten(1)
    for layer in model.tower.layers:
        h = x @ layer.linear.weight.T + layer.linear.bias
        for e in range(weights.shape[1]):
            expert = (x @ layer.lora.A[e].T) @ layer.lora.B[e] + layer.lora.bias[e]
            h = h + weights[:, e : e + 1] * expert
        x = torch.relu(h)
    return model.out(x).squeeze(1)


def manual_gate(model: CTRModel, domain: Tensor, tower_input: Tensor | None = None) -> Tensor:
    gate = model.tower.adapter.gate
    inputs = gate.domain_embedding.weight[domain]
    if tower_input is not None:
        inputs = torch.cat([inputs, tower_input], 1)
    return torch.softmax(inputs @ gate.proj.weight.T + gate.proj.bias, dim=1)


def test_mlora_uses_each_samples_domain_adapter() -> None:
    config = AdapterConfig(kind="mlora")
    model = build_model("mlp", FIELDS, NUM_DOMAINS, config, hidden_units=(16, 8))
    randomise_adapters(model)
    model.eval()
    sparse, domain = batch()
    one_hot = torch.nn.functional.one_hot(domain, NUM_DOMAINS).float()
    with torch.no_grad():
        assert model.routing == "domain"
        assert torch.allclose(model(sparse, domain), manual_mlp(model, sparse, one_hot), atol=1e-5)
        assert not torch.allclose(model(sparse, domain), manual_mlp(model, sparse, 0 * one_hot))


def test_mlora_single_layer_by_hand() -> None:
    """Domain d's sample through one adapted layer, written out with A_d, B_d, b_d."""
    model = build_model("mlp", FIELDS, NUM_DOMAINS, AdapterConfig(kind="mlora"), hidden_units=(8,))
    randomise_adapters(model)
    model.eval()
    sparse, domain = batch(1)
    d = int(domain)
    layer = model.tower.layers[0]
    x = model.embeddings(sparse).flatten(1)[0]
    w, b = layer.linear.weight, layer.linear.bias
    a_d, b_d, bias_d = layer.lora.A[d], layer.lora.B[d], layer.lora.bias[d]
    h = torch.relu(w @ x + b + b_d.T @ (a_d @ x) + bias_d)
    expected = model.out.weight[0] @ h + model.out.bias[0]
    with torch.no_grad():
        assert torch.allclose(model(sparse, domain)[0], expected, atol=1e-6)


@pytest.mark.parametrize("gate_input", ["domain", "domain_features"])
def test_moe_mixture_is_the_gate_weighted_sum_of_experts(gate_input: str) -> None:
    config = AdapterConfig(kind="moe", experts=4, gate={"input": gate_input})
    model = build_model("mlp", FIELDS, NUM_DOMAINS, config, hidden_units=(16, 8))
    randomise_adapters(model)
    model.eval()
    sparse, domain = batch()
    tower_input = model.embeddings(sparse).flatten(1) if gate_input == "domain_features" else None
    with torch.no_grad():
        gate = manual_gate(model, domain, tower_input)
        assert torch.allclose(model.gate_weights(sparse, domain), gate, atol=1e-6)
        assert torch.allclose(model(sparse, domain), manual_mlp(model, sparse, gate), atol=1e-5)


def test_expert_mode_equals_a_one_hot_mixture() -> None:
    model = build_model("mlp", FIELDS, NUM_DOMAINS, AdapterConfig(kind="moe", experts=5))
    randomise_adapters(model)
    model.eval()
    sparse, domain = batch()
    expert = torch.arange(len(domain)) % 5
    model.routing = "expert"
    with torch.no_grad():
        expected = manual_mlp(model, sparse, torch.nn.functional.one_hot(expert, 5).float())
        assert torch.allclose(model(sparse, domain, expert), expected, atol=1e-5)


def test_off_routing_ignores_experts_and_gate() -> None:
    model = build_model("deepfm", FIELDS, NUM_DOMAINS, AdapterConfig(kind="moe", experts=4))
    base = build_model("deepfm", FIELDS, NUM_DOMAINS, AdapterConfig())
    base.load_state_dict(model.state_dict(), strict=False)
    randomise_adapters(model)
    model.eval(), base.eval()
    model.routing = "off"
    sparse, domain = batch()
    with torch.no_grad():
        assert torch.equal(model(sparse, domain), base(sparse, domain))


def test_routing_defaults_and_validation() -> None:
    kinds = ("none", "mlora", "moe")
    models = {k: build_model("mlp", FIELDS, NUM_DOMAINS, AdapterConfig(kind=k)) for k in kinds}
    routings = {k: m.routing for k, m in models.items()}
    assert routings == {"none": "off", "mlora": "domain", "moe": "mixture"}
    assert {k: m.num_experts for k, m in models.items()} == {"none": 0, "mlora": 3, "moe": 3}
    with pytest.raises(ValueError, match=r"routing must be one of.*'mlora'.*'mixture'"):
        models["mlora"].routing = "mixture"
    with pytest.raises(ValueError, match="routing must be one of"):
        models["none"].routing = "domain"
    models["moe"].routing = "expert"
    sparse, domain = batch()
    with pytest.raises(ValueError, match="expert=LongTensor"):
        models["moe"](sparse, domain)
    with pytest.raises(ValueError, match="no gate"):
        models["mlora"].gate_weights(sparse, domain)


@pytest.mark.parametrize("gate_input", ["domain", "domain_features"])
def test_gate_weights_are_a_distribution_per_sample(gate_input: str) -> None:
    config = AdapterConfig(kind="moe", experts=6, gate={"input": gate_input})
    model = build_model("deepfm", FIELDS, NUM_DOMAINS, config)
    sparse, domain = batch()
    weights = model.gate_weights(sparse, domain)
    assert weights.shape == (32, 6)
    assert torch.allclose(weights.sum(1), torch.ones(32))
    assert (weights > 0).all()


@pytest.mark.parametrize(
    ("config", "ranks"),
    [
        (AdapterConfig(kind="mlora"), [8, 4, 2]),
        (AdapterConfig(kind="mlora", lora_reduce=100), [2, 1, 1]),
        (AdapterConfig(kind="moe", lora_reduce=256), [1, 1, 1]),
        (AdapterConfig(kind="moe", lora_rank=3, lora_reduce=2), [3, 3, 3]),
    ],
)
def test_rank_per_layer(config: AdapterConfig, ranks: list[int]) -> None:
    model = build_model("deepfm", FIELDS, NUM_DOMAINS, config)  # tower 256-128-64
    assert [layer.lora.rank for layer in model.tower.layers] == ranks
    for layer, r in zip(model.tower.layers, ranks, strict=True):
        out_features, in_features = layer.linear.weight.shape
        assert layer.lora.A[0].shape == (r, in_features)
        assert layer.lora.B[0].shape == (r, out_features)
        assert layer.lora.bias[0].shape == (out_features,)


def test_parameter_counts_by_hand() -> None:
    fields = [FieldSpec("user", 10), FieldSpec("item", 5)]
    kwargs = {"embedding_dim": 4, "hidden_units": (16, 8)}

    def counts(config: AdapterConfig) -> dict[str, int]:
        model = build_model("mlp", fields, 2, config, **kwargs)
        result = model.parameter_counts()
        assert result["total"] == sum(p.numel() for p in model.parameters())
        return result

    # embeddings 10*4 + 5*4; tower 8*16+16 + 16*8+8; output 8+1
    backbone = 60 + 280 + 9
    # layer 1 (8 -> 16, r=4): A 32 + B 64 + b 16; layer 2 (16 -> 8, r=2): A 32 + B 16 + b 8
    per_expert = 112 + 56
    base = counts(AdapterConfig())
    assert base == {"backbone": backbone, "adapter": 0, "gate": 0, "total": backbone}
    mlora = counts(AdapterConfig(kind="mlora", lora_reduce=4))
    assert mlora == {"backbone": backbone, "adapter": 336, "gate": 0, "total": backbone + 336}
    assert mlora["adapter"] == 2 * per_expert
    # gate: domain embedding 2*2 + Linear(2 -> 3) 9; with features Linear(2 + 8 -> 3) 33
    moe = counts(AdapterConfig(kind="moe", experts=3, lora_reduce=4, gate={"embedding_dim": 2}))
    assert (moe["adapter"], moe["gate"]) == (3 * per_expert, 13)
    features = AdapterConfig(
        kind="moe",
        experts=3,
        lora_reduce=4,
        gate={"embedding_dim": 2, "input": "domain_features"},
    )
    assert counts(features)["gate"] == 4 + 33


@pytest.mark.parametrize("kind", ["none", "mlora", "moe"])
def test_parameter_groups_partition_the_model(kind: str) -> None:
    model = build_model("deepfm", FIELDS, NUM_DOMAINS, AdapterConfig(kind=kind, experts=4))
    groups = [model.backbone_parameters(), model.gate_parameters(), model.expert_parameters()]
    ids = [id(p) for group in groups for p in group]
    assert len(ids) == len(set(ids))  # no overlap
    assert set(ids) == {id(p) for p in model.parameters()}  # nothing missing
    if kind != "none":
        stacked = model.expert_parameters()
        assert len(stacked) == 3 * len(model.tower.layers)
        assert all(p.shape[0] == model.num_experts for p in stacked)
        views = model.expert_tensors(1)
        assert [v.shape for v in views] == [p.shape[1:] for p in stacked]
        with torch.no_grad():
            for view in views:
                view.fill_(7.0)
        for p in stacked:  # the views write expert 1's slices, and only those
            assert (p[1] == 7.0).all() and not (p[0] == 7.0).any() and not (p[2] == 7.0).any()
    with pytest.raises(ValueError, match="expert must be in"):
        model.expert_tensors(model.num_experts)


@pytest.mark.parametrize("products", ["dense", "rows"])
def test_expert_routing_sends_gradients_only_to_the_routed_expert(products: str) -> None:
    config = AdapterConfig(kind="moe", experts=4, products=products)
    model = build_model("deepfm", FIELDS, NUM_DOMAINS, config)
    randomise_adapters(model)
    model.routing = "expert"
    sparse, domain = batch()
    model(sparse, domain, torch.full_like(domain, 2)).sum().backward()
    for e in range(4):
        grads = [p.grad[e] for p in model.expert_parameters()]
        if e == 2:
            assert all(g.abs().sum() > 0 for g in grads)
        else:
            assert all(not g.any() for g in grads)
    assert all(p.grad is None for p in model.gate_parameters())


def test_a_frozen_expert_is_never_updated() -> None:
    from moe_mlora.training.optim import make_adam
    from moe_mlora.training.phases import set_trainable

    model = build_model("mlp", FIELDS, NUM_DOMAINS, AdapterConfig(kind="mlora"))
    randomise_adapters(model)
    set_trainable(model, backbone=True, experts=[0, 2], gate=False)
    assert model.frozen_experts == {1}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_adam(
        trainable, 0.1, 0.01, model.expert_parameters(), lambda: model.frozen_experts
    )
    before = [t.clone() for e in range(3) for t in model.expert_tensors(e)]
    sparse, domain = batch()
    for _ in range(3):
        optimizer.zero_grad()
        model(sparse, domain).sum().backward()
        optimizer.step()
    after = [t for e in range(3) for t in model.expert_tensors(e)]
    per_expert = len(after) // 3
    for index, (old, new) in enumerate(zip(before, after, strict=True)):
        assert torch.equal(old, new) == (index // per_expert == 1)


def test_fresh_adapter_is_lora_initialised() -> None:
    model = build_model("mlp", FIELDS, NUM_DOMAINS, AdapterConfig(kind="moe", experts=2))
    layer = model.tower.layers[1]  # 256 -> 128
    bound = 1 / 256**0.5
    assert layer.lora.A[0].abs().max() <= bound and layer.lora.A[0].std() > bound / 4
    assert not layer.lora.B[0].any() and not layer.lora.bias[1].any()
    assert not torch.equal(layer.lora.A[0], layer.lora.A[1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "lora"}, "kind must be one of"),
        ({"kind": "moe", "experts": 0}, "experts must be >= 1, got 0"),
        ({"lora_reduce": 0}, "lora_reduce must be >= 1"),
        ({"lora_rank": 0}, "lora_rank must be >= 1"),
        ({"gate": {"input": "features"}}, r"gate\.input must be one of"),
        ({"gate": {"embedding_dim": 0}}, r"gate\.embedding_dim must be >= 1"),
    ],
)
def test_bad_adapter_config_names_the_key(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**kwargs)
