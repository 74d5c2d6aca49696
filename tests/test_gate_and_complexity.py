"""Gate options (input, top-k, balance loss), their config errors, and FLOP counting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from moe_mlora.config import ConfigError, compose
from moe_mlora.data.processed import FieldSpec
from moe_mlora.models import AdapterConfig, CTRModel, build_model
from moe_mlora.models.adapters import GateConfig, balance_loss, top_k_weights
from moe_mlora.models.complexity import complexity, flops_per_sample
from moe_mlora.pipeline.build import adapter_config
from moe_mlora.pipeline.runner import train_and_evaluate
from moe_mlora.training.module import CTRModule, Phase
from moe_mlora.training.phases import set_trainable
from moe_mlora.training.schedules import PhaseSpec, load_schedule

NUM_DOMAINS = 3
FIELDS = [FieldSpec("user", 30), FieldSpec("item", 20), FieldSpec("domain", NUM_DOMAINS)]


def batch(n: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, f.vocab_size, (n,), generator=g) for f in FIELDS], 1)
    return sparse, sparse[:, 2].clone()


def moe(experts: int = 4, gate: dict | None = None) -> CTRModel:
    """A small MoE MLP whose experts and gate are random, so routing matters."""
    torch.manual_seed(0)
    config = AdapterConfig(kind="moe", experts=experts, gate=gate)
    model = build_model("mlp", FIELDS, NUM_DOMAINS, config, hidden_units=(16, 8))
    with torch.no_grad():
        for p in model.expert_parameters() + model.gate_parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


# --------------------------------------------------------------------- top-k
@pytest.mark.parametrize("gate_input", ["domain", "domain_features"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_routes_each_sample_to_exactly_k_experts(gate_input: str, k: int) -> None:
    dense, sparse_gate = (
        moe(gate={"input": gate_input}),
        moe(gate={"input": gate_input, "top_k": k}),
    )
    sparse, domain = batch()
    with torch.no_grad():
        probs = dense.gate_weights(sparse, domain)
        weights = sparse_gate.gate_weights(sparse, domain)
    assert ((weights > 0).sum(1) == k).all()
    assert torch.allclose(weights.sum(1), torch.ones(len(domain)))
    chosen = probs.topk(k, dim=1).indices
    expected = torch.zeros_like(probs).scatter(1, chosen, probs.gather(1, chosen))
    assert torch.allclose(weights, expected / expected.sum(1, keepdim=True), atol=1e-6)


def test_top_1_mixture_equals_expert_routing_to_the_argmax() -> None:
    model = moe(gate={"input": "domain_features", "top_k": 1})
    sparse, domain = batch()
    with torch.no_grad():
        mixture = model(sparse, domain)
        best = model.gate_weights(sparse, domain).argmax(1)
        model.routing = "expert"
        assert torch.allclose(model(sparse, domain, best), mixture, atol=1e-6)


@pytest.mark.parametrize("gate_input", ["domain", "domain_features"])
def test_top_k_equal_to_the_expert_count_is_the_dense_softmax(gate_input: str) -> None:
    dense, full = moe(gate={"input": gate_input}), moe(gate={"input": gate_input, "top_k": 4})
    sparse, domain = batch()
    with torch.no_grad():
        assert torch.equal(full.gate_weights(sparse, domain), dense.gate_weights(sparse, domain))
        assert torch.equal(full(sparse, domain), dense(sparse, domain))
    probs = torch.softmax(torch.randn(5, 4), dim=1)
    assert torch.equal(top_k_weights(probs, 4), probs) and torch.equal(
        top_k_weights(probs, None), probs
    )


def test_only_the_domain_features_gate_sees_the_input() -> None:
    sparse, domain = batch()
    other = sparse.clone()
    other[:, :2] = (other[:, :2] + 1) % 20  # new user and item, same domain
    for gate_input, changes in (("domain", False), ("domain_features", True)):
        model = moe(gate={"input": gate_input})
        with torch.no_grad():
            a, b = model.gate_weights(sparse, domain), model.gate_weights(other, domain)
        assert (not torch.allclose(a, b)) == changes, gate_input


# -------------------------------------------------------------- balance loss
def test_balance_loss_known_values() -> None:
    uniform = torch.full((6, 4), 0.25)
    assert balance_loss(uniform, uniform).item() == pytest.approx(1.0)  # the minimum
    collapsed = F.one_hot(torch.zeros(6, dtype=torch.long), 4).float()
    assert balance_loss(collapsed, collapsed).item() == pytest.approx(4.0)  # the maximum, E
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    # dense: f = P = [0.7, 0.3] -> 2 * (0.49 + 0.09)
    assert balance_loss(probs, probs).item() == pytest.approx(1.16)
    # top-1: both samples go to expert 0, f = [1, 0] -> 2 * 0.7
    assert balance_loss(top_k_weights(probs, 1), probs).item() == pytest.approx(1.4)


def gate_phase_module(weight: float, top_k: int | None = None) -> CTRModule:
    model = moe(gate={"balance_loss_weight": weight, "top_k": top_k}).train()
    set_trainable(model, backbone=False, experts=False, gate=True)
    module = CTRModule(model, [f"d{d}" for d in range(NUM_DOMAINS)])
    module.phase = Phase(3, load_schedule("paper").phases[2])
    return module


def training_loss(module: CTRModule, logged: dict) -> tuple[Tensor, Tensor]:
    """Phase-3 loss and plain BCE of one batch; ``logged`` collects what the step logs."""
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, value)
    sparse, domain = batch(64)
    label = (torch.arange(64) % 3 == 0).float()
    torch.manual_seed(5)  # the same dropout mask in both forwards
    loss = module.training_step({"sparse": sparse, "domain": domain, "label": label}, 0)
    torch.manual_seed(5)
    bce = F.binary_cross_entropy_with_logits(module.model(sparse, domain), label)
    return loss, bce


def test_balance_loss_is_added_to_the_gate_phase_loss_when_weighted() -> None:
    logged: dict = {}
    module = gate_phase_module(0.5)
    loss, bce = training_loss(module, logged)
    aux = module.model.tower.adapter.auxiliary_loss()
    assert aux is not None and aux.item() > 1.0  # a random gate is not uniform
    assert loss.item() == pytest.approx(bce.item() + 0.5 * aux.item(), rel=1e-5)
    assert logged["phase3/train/balance_loss"].item() == pytest.approx(aux.item())

    logged.clear()
    unweighted = gate_phase_module(0.0)
    loss, bce = training_loss(unweighted, logged)
    assert loss.item() == pytest.approx(bce.item(), rel=1e-6)
    assert "phase3/train/balance_loss" not in logged
    assert unweighted.model.tower.adapter.auxiliary_loss() is None


@pytest.mark.parametrize("kind", ["joint", "backbone"])
def test_balance_loss_is_not_added_outside_the_gate_phase(kind: str) -> None:
    module = gate_phase_module(0.5)
    # the gate still routes, but this phase does not train it
    module.phase = Phase(1, PhaseSpec(kind, "mixture", ("backbone", "experts")))
    logged: dict = {}
    loss, bce = training_loss(module, logged)
    assert module.model.tower.adapter.auxiliary_loss() is not None
    assert loss.item() == pytest.approx(bce.item(), rel=1e-6)
    assert list(logged) == ["phase1/train/loss"]  # nothing about balance


def test_balance_loss_gradient_reaches_the_gate() -> None:
    """With top-1 the routing weight is exactly 1: only the balance loss trains the gate."""

    def gate_grad(weight: float) -> float:
        module = gate_phase_module(weight, top_k=1)
        loss, _ = training_loss(module, {})
        module.model.zero_grad()
        loss.backward()
        grads = [p.grad for p in module.model.gate_parameters() if p.grad is not None]
        assert all(p.grad is None for p in module.model.backbone_parameters())
        return sum(g.abs().sum().item() for g in grads)

    assert gate_grad(0.0) < 1e-6
    assert gate_grad(0.5) > 1e-3


# ----------------------------------------------------------- config errors
@pytest.mark.parametrize(
    ("gate", "message"),
    [
        ({"topk": 2}, r"unknown gate key\(s\) gate\.topk"),
        ({"top_k": 0}, r"gate\.top_k must be an integer >= 1"),
        ({"top_k": 5}, r"gate\.top_k must be in 1\.\.4"),
        ({"balance_loss_weight": -0.1}, r"gate\.balance_loss_weight must be .*>= 0"),
        ({"input": "features"}, r"gate\.input must be one of"),
    ],
)
def test_bad_gate_config_names_the_key(gate: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdapterConfig(kind="moe", experts=4, gate=gate)


def test_top_k_is_checked_against_the_default_expert_count() -> None:
    config = AdapterConfig(kind="moe", gate=GateConfig(top_k=4))  # E unknown until the model
    with pytest.raises(ValueError, match=r"gate\.top_k must be in 1\.\.3"):
        build_model("mlp", FIELDS, NUM_DOMAINS, config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+method.adapter.gate.topk=2"], r"method\.adapter: unknown gate key\(s\) gate\.topk"),
        (["experts=3", "method.adapter.gate.top_k=4"], r"gate\.top_k must be in 1\.\.3"),
        (["method.adapter.gate.top_k=8"], r"gate\.top_k must be in 1\.\.7"),  # E = D = 7
        (["+method.adapter.gate_input=domain"], r"gate_input is now method\.adapter\.gate\.input"),
    ],
)
def test_yaml_gate_errors_are_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        adapter_config(compose(overrides), num_domains=7)


def test_yaml_gate_block_maps_to_the_adapter_config() -> None:
    defaults = adapter_config(compose([]), num_domains=7).gate
    # the default schedule (warm) starts the gate at own experts: an anchored gate
    assert defaults == GateConfig(input="domain", embedding_dim=8, top_k=None, anchored=True)
    paper = adapter_config(compose(["method/schedule=paper"]), num_domains=7).gate
    assert paper == GateConfig(input="domain", embedding_dim=8, top_k=None, anchored=False)
    cfg = compose(
        ["method.adapter.gate.top_k=2", "method.adapter.gate.balance_loss_weight=0.01", "experts=4"]
    )
    config = adapter_config(cfg, num_domains=7)
    assert (config.experts, config.gate.top_k, config.gate.balance_loss_weight) == (4, 2, 0.01)


# -------------------------------------------------------------------- FLOPs
def test_mlp_flops_are_two_multiply_adds_per_weight() -> None:
    fields = [FieldSpec("user", 10), FieldSpec("item", 5)]
    model = build_model("mlp", fields, 2, AdapterConfig(), embedding_dim=4, hidden_units=(16, 8))
    sparse = torch.randint(0, 5, (10, 2))
    domain = torch.zeros(10, dtype=torch.long)
    hand = 2 * (8 * 16 + 16 * 8 + 8 * 1)  # tower 8 -> 16 -> 8, output 8 -> 1
    assert flops_per_sample(model, sparse, domain) == hand
    result = complexity(model.train(), sparse, domain)
    assert result["per_sample"] == result["base_per_sample"] == hand
    assert result["overhead_per_sample"] == 0 and result["routing"] == "off"
    assert model.training  # mode restored


def test_moe_flops_count_every_expert_and_the_gate() -> None:
    fields = [FieldSpec("user", 10), FieldSpec("item", 5)]
    config = AdapterConfig(
        kind="moe", experts=3, lora_reduce=4, gate={"input": "domain_features", "top_k": 1}
    )
    model = build_model("mlp", fields, 2, config, embedding_dim=4, hidden_units=(16, 8))
    sparse = torch.randint(0, 5, (10, 2))
    domain = torch.zeros(10, dtype=torch.long)
    base = 2 * (8 * 16 + 16 * 8 + 8)
    # per layer: x -> all experts' codes (in * E*r), then [codes; weights] -> out ((E*r + E) * out)
    layer1 = 2 * (8 * 3 * 4 + (3 * 4 + 3) * 16)  # 8 -> 16, r = 4
    layer2 = 2 * (16 * 3 * 2 + (3 * 2 + 3) * 8)  # 16 -> 8, r = 2
    gate = 2 * (8 + 8) * 3  # Linear(domain embedding 8 + tower input 8 -> 3)
    result = complexity(model, sparse, domain)
    assert result["base_per_sample"] == base
    assert result["per_sample"] == base + layer1 + layer2 + gate
    assert model.routing == "mixture"  # routing restored after the "off" count


# ---------------------------------------------------------------- end to end
def test_results_json_reports_complexity_and_the_balance_loss(tmp_path: Path) -> None:
    cfg = compose(
        [
            "data.users=200",
            "data.items=150",
            "data.ratings=6000",
            "model.hidden_units=[32,16]",
            "trainer.max_epochs=1",
            "logger.wandb.enabled=false",
            "progress=false",
            f"paths.cache_dir={tmp_path / 'cache'}",
            "experts=4",
            "method.adapter.gate.top_k=2",
            "method.adapter.gate.balance_loss_weight=0.1",
            "method/schedule=paper",  # a plain gate: at most top_k experts per row
        ]
    )
    train_and_evaluate(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    flops = saved["flops"]
    assert flops["routing"] == "mixture" and flops["batch_size"] > 0
    assert flops["per_sample"] > flops["base_per_sample"] > 0
    assert flops["overhead_per_sample"] == pytest.approx(
        flops["per_sample"] - flops["base_per_sample"]
    )
    assert flops["overhead_pct"] == pytest.approx(
        100 * flops["overhead_per_sample"] / flops["base_per_sample"]
    )
    params = saved["parameters"]
    assert params["adapter_overhead"] == params["adapter"] + params["gate"]
    gate_rows = saved["test"]["gate_weights"].values()
    assert all(sum(w > 0 for w in row) <= 2 and sum(row) == pytest.approx(1) for row in gate_rows)
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "phase3/train/balance_loss" in header
