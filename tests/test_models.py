"""Backbones, embeddings and shared layers: shapes, math, and backbone/adapter weight sharing."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from moe_mlora.data.processed import FieldSpec
from moe_mlora.models import MODELS, AdapterConfig, CTRModel, build_model
from moe_mlora.models.features import FieldEmbeddings
from moe_mlora.models.layers import Dropout, FactorizationMachine, FirstOrderLinear

NUM_DOMAINS = 3
FIELDS = [FieldSpec("user", 50), FieldSpec("item", 40), FieldSpec("domain", NUM_DOMAINS)]
ADAPTED = [
    AdapterConfig(kind="mlora"),
    AdapterConfig(kind="moe", experts=5),
    AdapterConfig(kind="moe", experts=2, gate={"input": "domain_features"}, lora_rank=3),
]


def batch(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, f.vocab_size, (n,), generator=g) for f in FIELDS], 1)
    domain = sparse[:, 2].clone()
    expert = torch.randint(0, 2, (n,), generator=g)
    return sparse, domain, expert


def is_adapter_key(key: str) -> bool:
    return ".lora." in key or key.startswith("tower.adapter.")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_returns_one_logit_per_sample(name: str) -> None:
    model = build_model(name, FIELDS, NUM_DOMAINS, AdapterConfig())
    sparse, domain, _ = batch()
    out = model(sparse, domain)
    assert isinstance(model, CTRModel)
    assert out.shape == (64,) and out.dtype == torch.float32


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("config", ADAPTED, ids=lambda c: f"{c.kind}-{c.gate.input}")
def test_zero_initialised_adapters_reproduce_the_base_model_exactly(
    name: str, config: AdapterConfig
) -> None:
    torch.manual_seed(0)
    base = build_model(name, FIELDS, NUM_DOMAINS, AdapterConfig()).eval()
    adapted = build_model(name, FIELDS, NUM_DOMAINS, config).eval()
    result = adapted.load_state_dict(base.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(is_adapter_key(k) for k in result.missing_keys)

    sparse, domain, expert = batch()
    with torch.no_grad():
        expected = base(sparse, domain)
        for routing in adapted.tower.adapter.routings:
            adapted.routing = routing
            assert torch.equal(adapted(sparse, domain, expert), expected), routing


@pytest.mark.parametrize("name", sorted(MODELS))
def test_backbone_state_dict_keys_do_not_depend_on_the_adapter(name: str) -> None:
    base_keys = set(build_model(name, FIELDS, NUM_DOMAINS, AdapterConfig()).state_dict())
    assert "tower.layers.0.linear.weight" in base_keys
    for config in ADAPTED:
        keys = build_model(name, FIELDS, NUM_DOMAINS, config).state_dict()
        assert {k for k in keys if not is_adapter_key(k)} == base_keys


def test_unknown_model_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'nope'.*deepfm.*mlp"):
        build_model("nope", FIELDS, NUM_DOMAINS, AdapterConfig())


def test_build_model_accepts_a_mapping_and_rejects_unknown_keys() -> None:
    model = build_model("mlp", FIELDS, NUM_DOMAINS, {"kind": "moe", "experts": 4})
    assert model.num_experts == 4 and model.routing == "mixture"
    with pytest.raises(ValueError, match=r"unknown adapter keys.*'expert'"):
        build_model("mlp", FIELDS, NUM_DOMAINS, {"kind": "moe", "expert": 4})


def test_hidden_units_and_embedding_dim_shape_the_tower() -> None:
    model = build_model("deepfm", FIELDS, NUM_DOMAINS, None, embedding_dim=4, hidden_units=[16, 8])
    shapes = [tuple(layer.linear.weight.shape) for layer in model.tower.layers]
    assert shapes == [(16, 12), (8, 16)]
    assert model.out.weight.shape == (1, 8) and model.out.bias is None


def test_sparse_with_the_wrong_number_of_fields_is_a_clear_error() -> None:
    model = build_model("mlp", FIELDS, NUM_DOMAINS, AdapterConfig())
    with pytest.raises(ValueError, match=r"\[batch, 3\].*user"):
        model(torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long))


def test_field_embeddings_init_and_flat_view() -> None:
    emb = FieldEmbeddings([FieldSpec("a", 1000), FieldSpec("b", 7)], dim=8)
    assert emb.tables[0].weight.std().item() == pytest.approx(1e-4, rel=0.1)
    out = emb(torch.tensor([[1, 2], [3, 4]]))
    assert out.shape == (2, 2, 8)
    assert torch.equal(FieldEmbeddings.flat(out)[:, 8:], emb.tables[1].weight[[2, 4]])
    assert emb.output_dim == 16


def test_pretrained_field_is_frozen_and_projected() -> None:
    table = torch.randn(6, 5)
    fields = [FieldSpec("user", 6, pretrained=table), FieldSpec("domain", 2)]
    model = build_model("deepfm", fields, 2, AdapterConfig(kind="mlora"), embedding_dim=4)
    pretrained = model.embeddings.tables[0]
    assert torch.equal(pretrained.table, table)
    assert all(p is not pretrained.table for p in model.parameters())  # a buffer, never trained
    assert "embeddings.tables.0.table" not in model.state_dict()  # not copied into checkpoints
    assert pretrained.proj.weight.shape == (4, 5)

    sparse = torch.tensor([[3, 1], [5, 0]])
    expected = table[[3, 5]] @ pretrained.proj.weight.T
    assert torch.allclose(model.embeddings(sparse)[:, 0], expected)
    model(sparse, sparse[:, 1]).sum().backward()
    assert pretrained.proj.weight.grad is not None


def test_pretrained_table_with_wrong_rows_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"field 'item'.*vocab_size=6"):
        FieldEmbeddings([FieldSpec("item", 6, pretrained=torch.zeros(5, 3))], dim=4)


def test_factorization_machine_equals_the_pairwise_sum() -> None:
    emb = torch.randn(5, 4, 3)
    pairwise = sum((emb[:, i] * emb[:, j]).sum(1) for i, j in itertools.combinations(range(4), 2))
    assert torch.allclose(FactorizationMachine()(emb), pairwise, atol=1e-5)


def test_first_order_linear_sums_one_weight_per_field_plus_bias() -> None:
    fields = [FieldSpec("a", 3), FieldSpec("b", 4)]
    linear = FirstOrderLinear(fields)
    with torch.no_grad():
        linear.weight.copy_(torch.arange(7.0).unsqueeze(1))
        linear.bias.fill_(0.5)
    # field b's rows start at offset 3
    assert torch.equal(linear(torch.tensor([[2, 1], [0, 3]])), torch.tensor([6.5, 6.5]))


def test_deepfm_logit_is_linear_plus_fm_plus_tower() -> None:
    model = build_model("deepfm", FIELDS, NUM_DOMAINS, AdapterConfig()).eval()
    sparse, domain, _ = batch()
    emb = model.embeddings(sparse)
    deep = model.tower(emb.flatten(1), domain)
    expected = model.linear(sparse) + model.fm(emb) + (deep @ model.out.weight.T).squeeze(1)
    assert torch.allclose(model(sparse, domain), expected)


@pytest.mark.parametrize("mask", ["bits", "uniform"])
@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_dropout_keeps_one_minus_p_scaled_and_is_identity_in_eval(mask, p) -> None:
    torch.manual_seed(0)
    drop = Dropout(p, mask=mask)
    x = torch.ones(400_001)  # not a multiple of 4: the last 64-bit draw is partly used
    y = drop(x)
    assert (y == 0).float().mean().item() == pytest.approx(p, abs=0.003)
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)
    assert not torch.equal(y, drop(x))  # a fresh mask per call
    assert drop.eval()(x) is x
    with pytest.raises(ValueError, match="dropout"):
        Dropout(1.0)
    with pytest.raises(ValueError, match="dropout_mask"):
        Dropout(0.5, mask="bernoulli")


def test_dropout_masks_are_independent_across_elements_and_keep_dtype() -> None:
    """Neighbouring elements share a 64-bit draw under ``bits``: they must still be
    independent (each pair of the four kept together a quarter of the time at p = 0.5)."""
    torch.manual_seed(1)
    kept = Dropout(0.5)(torch.ones(200_000, 4)) != 0
    for i in range(4):
        for j in range(i + 1, 4):
            assert (kept[:, i] & kept[:, j]).float().mean().item() == pytest.approx(0.25, abs=0.005)
    assert Dropout(0.5)(torch.ones(3, 5, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_uniform_dropout_mask_is_the_mask_of_earlier_releases() -> None:
    torch.manual_seed(2)
    x = torch.randn(64, 33)
    expected = x * torch.rand_like(x).ge_(0.3).div_(0.7)
    torch.manual_seed(2)
    torch.randn(64, 33)
    assert torch.equal(Dropout(0.3, mask="uniform")(x), expected)


def test_set_dropout_mask_reaches_every_dropout_of_a_model() -> None:
    from moe_mlora.models.layers import set_dropout_mask

    model = nn.Sequential(Dropout(0.2), nn.Sequential(nn.Linear(2, 2), Dropout(0.4)))
    set_dropout_mask(model, "uniform")
    assert [m.mask for m in model.modules() if isinstance(m, Dropout)] == ["uniform"] * 2
    with pytest.raises(ValueError, match="dropout_mask"):
        set_dropout_mask(model, "fast")


def test_field_softmax_equals_torch_softmax_with_its_gradient() -> None:
    from moe_mlora.models.layers import field_softmax

    scores = torch.randn(16, 2, 7, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(field_softmax, (scores,))
    big = (torch.randn(64, 2, 7, 7) * 40).requires_grad_()  # large scores: no overflow
    mine, theirs = field_softmax(big), torch.softmax(big, dim=-1)
    torch.testing.assert_close(mine, theirs)
    grad = torch.randn_like(mine)
    torch.testing.assert_close(
        torch.autograd.grad(mine, big, grad)[0], torch.autograd.grad(theirs, big, grad)[0]
    )
    half = torch.randn(4, 2, 7, 7, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = field_softmax(half.bfloat16())  # in float32, as autocast runs softmax
    out.sum().backward()
    assert out.dtype == torch.float32 and half.grad.dtype == torch.float32
