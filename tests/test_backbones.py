"""The eight CTR backbones (and MLP): shapes, training signal, adapter exactness, layer math.

Layer checks compare the batched layers with explicit loops over pairs, heads
and feature maps written the way the papers (and DeepCTR-Torch) state them,
plus a few values worked out by hand.
"""

from __future__ import annotations

import inspect
import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moe_mlora.data.processed import FieldSpec
from moe_mlora.models import MODELS, AdapterConfig, CTRModel, build_model
from moe_mlora.models.layers import (
    CIN,
    BiInteractionPooling,
    BilinearInteraction,
    CINMap,
    CrossNet,
    InnerProduct,
    InteractingLayer,
    OuterProduct,
    SENETLayer,
)

NUM_DOMAINS = 3
FIELDS = [FieldSpec("user", 30), FieldSpec("item", 20), FieldSpec("domain", NUM_DOMAINS)]
NAMES = sorted(MODELS)
NEW_BACKBONES = ["autoint", "dcn", "fibinet", "nfm", "pnn", "wdl", "xdeepfm"]
SMALL = {"embedding_dim": 4, "hidden_units": (16, 8)}
CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"


def batch(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, f.vocab_size, (n,), generator=g) for f in FIELDS], 1)
    labels = torch.randint(0, 2, (n,), generator=g).float()
    return sparse, sparse[:, 2].clone(), labels


def model(name: str, kind: str = "none", dropout: float = 0.0, **options) -> CTRModel:
    config = AdapterConfig(kind=kind, experts=2 if kind == "moe" else None)
    return build_model(name, FIELDS, NUM_DOMAINS, config, dropout=dropout, **SMALL, **options)


def loss_of(net: CTRModel, sparse, domain, labels) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(net(sparse, domain), labels)


# -- every backbone ----------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_one_finite_logit_per_sample(name: str) -> None:
    torch.manual_seed(0)
    sparse, domain, labels = batch()
    net = model(name, dropout=0.5)
    logits = net(sparse, domain)
    assert logits.shape == (32,) and logits.dtype == torch.float32
    assert torch.isfinite(F.binary_cross_entropy_with_logits(logits, labels))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["none", "moe"])
def test_gradients_reach_every_trainable_parameter(name: str, kind: str) -> None:
    torch.manual_seed(0)
    net = model(name, kind)
    if kind == "moe":  # B = 0 would leave A without gradient
        assert net.routing == "mixture"
        for layer in net.tower.layers:
            for b in layer.lora.B:
                torch.nn.init.normal_(b, std=0.1)
    loss_of(net, *batch()).backward()
    silent = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert silent == []


@pytest.mark.parametrize("name", NAMES)
def test_one_adam_step_lowers_the_loss_on_a_fixed_batch(name: str) -> None:
    torch.manual_seed(0)
    net = model(name)
    data = batch(64)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    before = loss_of(net, *data)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        assert loss_of(net, *data) < before


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["mlora", "moe"])
def test_zero_initialised_adapters_reproduce_the_base_logits_exactly(name: str, kind: str) -> None:
    torch.manual_seed(0)
    base = model(name).eval()
    adapted = model(name, kind).eval()
    result = adapted.load_state_dict(base.state_dict(), strict=False)
    assert result.unexpected_keys == []
    sparse, domain, _ = batch()
    with torch.no_grad():
        assert torch.equal(adapted(sparse, domain), base(sparse, domain))


@pytest.mark.parametrize(
    ("name", "options", "tower_in"),
    [
        ("wdl", {}, 3 * 4),
        ("nfm", {}, 4),  # the bi-interaction vector
        ("pnn", {}, 3 * 4 + 3),  # embeddings + 3 inner products
        ("pnn", {"use_outer": True, "kernel_type": "vec"}, 3 * 4 + 3 + 3),
        ("fibinet", {}, 3 * 2 * 4),  # F (F - 1) dim: SENET and raw bilinear pairs
        ("autoint", {}, 3 * 4),
        ("dcn", {"cross_parameterization": "matrix"}, 3 * 4),
        ("xdeepfm", {"cin_layer_size": [6, 4]}, 3 * 4),
    ],
)
def test_each_tower_reads_its_models_input(name: str, options: dict, tower_in: int) -> None:
    net = model(name, **options)
    assert net.tower.layers[0].linear.in_features == tower_in
    assert net(*batch()[:2]).shape == (32,)


@pytest.mark.parametrize("name", NEW_BACKBONES)
def test_model_yaml_knobs_are_the_constructor_defaults(name: str) -> None:
    """The YAML documents the real defaults, and every key is a constructor argument."""
    from omegaconf import OmegaConf

    conf = OmegaConf.to_container(OmegaConf.load(CONF_MODEL / f"{name}.yaml"))
    assert conf.pop("name") == name
    defaults = {
        k: p.default
        for k, p in inspect.signature(MODELS[name].__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    for key, value in conf.items():
        expected = list(defaults[key]) if isinstance(defaults[key], tuple) else defaults[key]
        assert value == expected, key


def test_bad_knobs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="att_head_num"):
        model("autoint", att_head_num=3)
    with pytest.raises(ValueError, match="cross_parameterization"):
        model("dcn", cross_parameterization="diagonal")
    with pytest.raises(ValueError, match="even"):
        model("xdeepfm", cin_layer_size=[5, 4])
    with pytest.raises(ValueError, match="bilinear_type"):
        model("fibinet", bilinear_type="pairs")
    with pytest.raises(ValueError, match="kernel_type"):
        model("pnn", use_outer=True, kernel_type="full")


# -- interaction layers: known answers --------------------------------------------
def pairs(n: int) -> list[tuple[int, int]]:
    return list(itertools.combinations(range(n), 2))


def test_bi_interaction_is_the_sum_of_pairwise_products() -> None:
    emb = torch.randn(5, 4, 3, dtype=torch.float64)
    expected = sum(emb[:, i] * emb[:, j] for i, j in pairs(4))
    assert torch.allclose(BiInteractionPooling()(emb), expected)


def test_inner_product_matches_a_loop_over_pairs() -> None:
    emb = torch.randn(5, 4, 3)
    expected = torch.stack([(emb[:, i] * emb[:, j]).sum(-1) for i, j in pairs(4)], 1)
    assert torch.allclose(InnerProduct(4)(emb), expected)


@pytest.mark.parametrize("kernel_type", ["mat", "vec", "num"])
def test_outer_product_matches_a_loop_over_pairs(kernel_type: str) -> None:
    torch.manual_seed(0)
    emb = torch.randn(5, 4, 3)
    layer = OuterProduct(4, 3, kernel_type)
    k = layer.kernel
    expected = []
    for n, (i, j) in enumerate(pairs(4)):
        p, q = emb[:, i], emb[:, j]
        if kernel_type == "mat":  # q^T K_n p with K_n[a, c] = kernel[a, n, c]
            expected.append(((p @ k[:, n, :].T) * q).sum(-1))
        else:
            expected.append((p * q * k[n]).sum(-1))
    assert torch.allclose(layer(emb), torch.stack(expected, 1), atol=1e-6)


def test_outer_product_mat_by_hand() -> None:
    layer = OuterProduct(2, 2, "mat")
    with torch.no_grad():  # one pair, K = [[1, 2], [3, 4]]
        layer.kernel.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]).unsqueeze(1))
    emb = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # e_0 = (1, 0), e_1 = (0, 1)
    assert layer(emb).item() == 3.0  # e_1^T K e_0 = K[1, 0]


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("scaling", [False, True])
def test_interacting_layer_matches_a_loop_over_heads(residual: bool, scaling: bool) -> None:
    torch.manual_seed(0)
    emb = torch.randn(5, 3, 4)
    layer = InteractingLayer(4, num_heads=2, residual=residual, scaling=scaling)
    w_q, w_k, w_v, *w_res = layer.weight.split(4, dim=1)
    heads = []
    for h in range(2):
        cols = slice(2 * h, 2 * h + 2)
        q, k, v = emb @ w_q[:, cols], emb @ w_k[:, cols], emb @ w_v[:, cols]
        scores = q @ k.transpose(1, 2) / (2**0.5 if scaling else 1.0)
        heads.append(torch.softmax(scores, dim=-1) @ v)
    expected = torch.cat(heads, dim=-1) + (emb @ w_res[0] if residual else 0)
    assert torch.allclose(layer(emb), torch.relu(expected), atol=1e-6)


def test_cross_net_by_hand() -> None:
    x0 = torch.tensor([[1.0, 2.0]])
    vector = CrossNet(2, num_layers=1, parameterization="vector")
    matrix = CrossNet(2, num_layers=1, parameterization="matrix")
    with torch.no_grad():
        vector.kernels.copy_(torch.tensor([[[3.0], [4.0]]]))
        vector.bias.copy_(torch.tensor([[0.5, -1.0]]))
        matrix.kernels.copy_(torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]))
        matrix.bias.copy_(torch.tensor([[0.0, 1.0]]))
    # x0 * (x0 . w) + b + x0 = [1, 2] * 11 + [0.5, -1] + [1, 2]
    assert torch.equal(vector(x0), torch.tensor([[12.5, 23.0]]))
    # x0 * (W x0 + b) + x0 = [1, 2] * [1, 5] + [1, 2]
    assert torch.equal(matrix(x0), torch.tensor([[2.0, 12.0]]))


@pytest.mark.parametrize("parameterization", ["vector", "matrix"])
def test_cross_net_layers_follow_the_recursion(parameterization: str) -> None:
    torch.manual_seed(0)
    x0 = torch.randn(5, 6)
    net = CrossNet(6, num_layers=3, parameterization=parameterization)
    x = x0
    for w, b in zip(net.kernels, net.bias, strict=True):
        inner = x @ w if parameterization == "vector" else x @ w.T
        x = x0 * inner + b + x if parameterization == "vector" else x0 * (inner + b) + x
    assert net(x0).shape == (5, 6) and torch.allclose(net(x0), x, atol=1e-6)


def test_cin_by_hand() -> None:
    cin = CIN(2, layer_sizes=(1,), activation="linear", split_half=False)
    with torch.no_grad():
        cin.maps[0].weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1))  # [in, out]
        cin.maps[0].bias.fill_(0.5)
    emb = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    # products e_m * e_h, channel m * 2 + h: [1, 4], [3, 8], [3, 8], [9, 16]
    # map = 1*[1, 4] + 2*[3, 8] + 3*[3, 8] + 4*[9, 16] + 0.5 = [52.5, 108.5]; summed over dim
    assert torch.equal(cin(emb), torch.tensor([[161.0]]))


@pytest.mark.parametrize("split_half", [True, False])
def test_cin_matches_a_loop_over_feature_maps(split_half: bool) -> None:
    torch.manual_seed(0)
    emb = torch.randn(4, 3, 5)
    sizes = (4, 6, 3)
    cin = CIN(3, sizes, activation="relu", split_half=split_half)
    assert cin.output_dim == (2 + 3 + 3 if split_half else 13)
    hidden, outputs = emb, []
    for i, layer in enumerate(cin.maps):
        w, b = layer.weight.T, layer.bias  # [out, in]
        maps = []
        for s in range(w.shape[0]):
            terms = [
                w[s, m * hidden.shape[1] + h] * emb[:, m] * hidden[:, h]
                for m in range(3)
                for h in range(hidden.shape[1])
            ]
            maps.append(torch.relu(sum(terms) + b[s]))
        maps = torch.stack(maps, 1)
        if split_half and i < len(sizes) - 1:
            hidden, direct = maps[:, : sizes[i] // 2], maps[:, sizes[i] // 2 :]
        else:
            hidden = direct = maps
        outputs.append(direct.sum(-1))
    assert torch.allclose(cin(emb), torch.cat(outputs, 1), atol=1e-5)


def test_cin_map_is_initialised_as_deepctr_conv1d() -> None:
    torch.manual_seed(7)
    conv = torch.nn.Conv1d(12, 5, kernel_size=1)
    torch.manual_seed(7)
    layer = CINMap(12, 5)
    assert layer.weight.shape == (12, 5)  # stored [in, out]
    assert torch.equal(layer.weight.T, conv.weight.squeeze(-1))
    assert torch.equal(layer.bias, conv.bias)
    x0, hidden = torch.randn(7, 3), torch.randn(7, 4)
    products = (x0.unsqueeze(2) * hidden.unsqueeze(1)).flatten(1)  # column m * 4 + h
    expected = conv(products.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(layer(x0, hidden), expected, atol=1e-6)
    with torch.no_grad():  # the inference path (no custom autograd function)
        assert torch.allclose(layer(x0, hidden), expected, atol=1e-6)
    assert torch.allclose(layer(x0, hidden, slice(2, None)), expected[:, 2:], atol=1e-6)


def test_cin_map_backward_matches_autograd() -> None:
    """The hand-written backward of the products + matmul, checked numerically in float64."""
    torch.manual_seed(3)
    layer = CINMap(12, 5).double()
    x0 = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    hidden = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: layer(a, b, slice(1, 4)), (x0, hidden))
    out = layer(x0, hidden).square().sum()
    grads = torch.autograd.grad(out, [x0, hidden, layer.weight, layer.bias])
    products = (x0.unsqueeze(2) * hidden.unsqueeze(1)).flatten(1)
    plain = torch.addmm(layer.bias, products, layer.weight).square().sum()
    expected = torch.autograd.grad(plain, [x0, hidden, layer.weight, layer.bias])
    for got, want in zip(grads, expected, strict=True):
        assert torch.allclose(got, want)


def test_cin_map_trains_under_bf16_autocast() -> None:
    torch.manual_seed(4)
    layer = CINMap(12, 5)
    x0 = torch.randn(6, 3, requires_grad=True)
    hidden = torch.randn(6, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x0, hidden)
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16
    assert x0.grad.dtype == layer.weight.grad.dtype == torch.float32
    reference = CINMap(12, 5)
    reference.load_state_dict(layer.state_dict())
    x0_ref = x0.detach().clone().requires_grad_()
    reference(x0_ref, hidden.detach()).square().sum().backward()
    assert torch.allclose(x0.grad, x0_ref.grad, rtol=0.05, atol=0.05)


def test_senet_reweights_each_field() -> None:
    torch.manual_seed(0)
    emb = torch.randn(5, 7, 3)
    senet = SENETLayer(7, reduction_ratio=3)
    assert senet.squeeze.weight.shape == (2, 7) and senet.excite.weight.shape == (7, 2)
    weights = senet.field_weights(emb)
    assert weights.shape == (5, 7) and (weights >= 0).all()
    expected = torch.relu(torch.relu(emb.mean(-1) @ senet.squeeze.weight.T) @ senet.excite.weight.T)
    assert torch.allclose(weights, expected)
    assert torch.allclose(senet(emb), emb * weights.unsqueeze(-1))
    assert SENETLayer(2, reduction_ratio=3).squeeze.weight.shape == (1, 2)  # at least 1


@pytest.mark.parametrize("bilinear_type", ["all", "each", "interaction", "field_interaction"])
def test_bilinear_matches_a_loop_over_pairs(bilinear_type: str) -> None:
    torch.manual_seed(0)
    emb = torch.randn(5, 4, 3)
    layer = BilinearInteraction(4, 3, bilinear_type)
    kind = bilinear_type.removeprefix("field_")
    expected = []
    for n, (i, j) in enumerate(pairs(4)):
        w = layer.weight[{"all": 0, "each": i, "interaction": n}[kind]]
        expected.append((emb[:, i] @ w.T) * emb[:, j])  # nn.Linear(dim, dim, bias=False)
    assert layer.weight.shape[0] == {"all": 1, "each": 4, "interaction": 6}[kind]
    assert torch.allclose(layer(emb), torch.stack(expected, 1), atol=1e-6)
    stacked = torch.stack([emb, 2 * emb], dim=1)  # leading axes are batched
    assert torch.allclose(layer(stacked)[:, 1], 4 * layer(emb), atol=1e-5)


# -- end to end through the Hydra config --------------------------------------------
ROTATION = [
    (name, ["base", "mlora", "moe_mlora"][i % 3]) for i, name in enumerate(NEW_BACKBONES)
] + [("fibinet", "base"), ("fibinet", "mlora")]  # fibinet also gets moe_mlora in the rotation


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "method"), sorted(set(ROTATION)))
def test_backbone_trains_end_to_end(name: str, method: str, cache_dir: Path, tmp_path) -> None:
    from moe_mlora.config import compose
    from moe_mlora.pipeline.runner import train_and_evaluate

    overrides = [
        f"model={name}",
        f"method={method}",
        "data.users=200",
        "data.items=150",
        "data.ratings=6000",
        "model.hidden_units=[32,16]",
        "trainer.max_epochs=1",
        "logger.wandb.enabled=false",
        "progress=false",
        f"paths.cache_dir={cache_dir}",
    ]
    train_and_evaluate(compose(overrides), tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "completed" and saved["run"]["model"] == name
    assert 0.0 <= saved["test"]["wauc"] <= 1.0
    assert (saved["parameters"]["adapter"] > 0) == (method != "base")


def test_xdeepfm_trains_under_bf16_autocast() -> None:
    """Past its first layer a CIN layer's ``hidden`` is the previous layer's bf16 output,
    while ``x0`` stays float32: the hand-written backward must take both."""
    torch.manual_seed(5)
    fields = [FieldSpec("user", 30), FieldSpec("item", 20), FieldSpec("genre", 6)]
    model = build_model("xdeepfm", fields, 2, AdapterConfig("none"))
    sparse = torch.stack([torch.randint(0, f.vocab_size, (16,)) for f in fields], 1)
    domain = torch.randint(0, 2, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(sparse, domain)
    logits.float().square().mean().backward()
    cin_grads = [p.grad for p in model.cin.parameters()]
    assert len(model.cin.maps) > 1 and all(g is not None for g in cin_grads)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
