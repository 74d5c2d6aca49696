"""The multi-domain towers (Shared-Bottom, MMoE, PLE, STAR, PEPNet) on every backbone."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from test_run import tiny

from moe_mlora.config import compose
from moe_mlora.data.processed import FieldSpec
from moe_mlora.models import MODELS, build_model
from moe_mlora.models.adapters import AdapterConfig
from moe_mlora.models.complexity import flops_per_sample
from moe_mlora.models.multidomain import TOWERS, DomainGroups
from moe_mlora.pipeline.runner import train_and_evaluate

NUM_DOMAINS = 5  # unlike any other first dimension of these towers' parameters
FIELDS = [FieldSpec("user", 50), FieldSpec("item", 40), FieldSpec("domain", NUM_DOMAINS + 1)]
SMALL = {"embedding_dim": 4, "hidden_units": (16, 8), "dropout": 0.0}


def model(kind: str, backbone: str = "deepfm", seed: int = 0):
    torch.manual_seed(seed)
    return build_model(backbone, FIELDS, NUM_DOMAINS, tower={"kind": kind}, **SMALL)


def batch(n: int = 80, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    domain = torch.arange(n) % NUM_DOMAINS
    sparse = torch.stack(
        [torch.randint(0, 50, (n,), generator=generator),
         torch.randint(0, 40, (n,), generator=generator), domain + 1], dim=1,
    )  # fmt: skip
    label = torch.randint(0, 2, (n,), generator=generator).float()
    return sparse, domain, label


def loss_of(net, sparse, domain, label):
    return torch.nn.functional.binary_cross_entropy_with_logits(net(sparse, domain), label)


@pytest.mark.parametrize("kind", TOWERS)
@pytest.mark.parametrize("backbone", MODELS)
def test_every_tower_composes_with_every_backbone(kind, backbone):
    net = model(kind, backbone)
    sparse, domain, label = batch()
    logits = net(sparse, domain)
    assert logits.shape == (80,) and torch.isfinite(logits).all()
    loss_of(net, sparse, domain, label).backward()
    missing = [name for name, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [], f"no gradient reaches {missing}"


@pytest.mark.parametrize("kind", TOWERS)
@pytest.mark.parametrize("backbone", MODELS)
def test_every_tower_trains_under_bf16_autocast_on_every_backbone(kind, backbone):
    """``trainer.precision=bf16-mixed``: the hand-written backwards (MMoE's and PLE's mix, the
    CIN's) meet float32 and bf16 tensors side by side."""
    net = model(kind, backbone)
    sparse, domain, label = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(sparse, domain)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), label)
    loss.backward()
    missing = [name for name, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [], f"no gradient reaches {missing}"
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("kind", TOWERS)
def test_every_tower_takes_a_backbone_with_one_hidden_layer(kind):
    """``model.hidden_units=[32]``: the towers' defaults split the hidden units into experts
    (or a bottom) and per-domain towers, and one layer leaves the experts none of their own."""
    torch.manual_seed(0)
    net = build_model("deepfm", FIELDS, NUM_DOMAINS, tower={"kind": kind}, embedding_dim=4,
                      hidden_units=(8,), dropout=0.0)  # fmt: skip
    sparse, domain, label = batch()
    loss_of(net, sparse, domain, label).backward()
    missing = [name for name, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_mix_backward_under_bf16_agrees_with_autograds():
    from moe_mlora.models.multidomain.mmoe import mix

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 4, generator=generator)
    experts = torch.randn(64, 4, 32, generator=generator)
    grads = []
    for ours in (True, False):
        weights = logits.clone().requires_grad_()
        inputs = experts.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            gate = torch.softmax(weights, dim=-1)  # float32 under autocast
            hidden = inputs.bfloat16()
            plain = torch.bmm(gate.unsqueeze(1), hidden).squeeze(1)
            out = mix(gate, hidden) if ours else plain
        out.float().square().sum().backward()
        grads.append((weights.grad, inputs.grad))
    for got, want in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("kind", TOWERS)
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(kind):
    net = model(kind)
    sparse, domain, label = batch()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    before = loss_of(net, sparse, domain, label).item()
    for _ in range(20):
        optimizer.zero_grad()
        loss_of(net, sparse, domain, label).backward()
        optimizer.step()
    assert loss_of(net, sparse, domain, label).item() < before


@pytest.mark.parametrize("kind", TOWERS)
def test_domain_d_parameters_change_only_domain_d_outputs(kind):
    net = model(kind).eval()
    sparse, domain, _ = batch()
    with torch.no_grad():
        before = net(sparse, domain)
        per_domain = [p for p in net.domain_parameters() if p.shape[0] == NUM_DOMAINS]
        assert per_domain, "the tower has no per-domain tensor"
        for parameter in per_domain:
            parameter[2] += 0.5 * torch.randn_like(parameter[2])
        after = net(sparse, domain)
    changed = (after - before).abs() > 1e-6
    assert changed[domain == 2].all()
    assert not changed[domain != 2].any()


@pytest.mark.parametrize("kind", TOWERS)
def test_the_batched_forward_equals_a_loop_over_domains(kind):
    net = model(kind).eval()
    sparse, domain, _ = batch()
    with torch.no_grad():
        together = net(sparse, domain)
        for d in range(NUM_DOMAINS):
            rows = domain == d
            alone = net(sparse[rows], domain[rows])
            torch.testing.assert_close(together[rows], alone, rtol=1e-5, atol=1e-6)


def test_domain_groups_apply_each_rows_own_weights():
    x = torch.randn(9, 3)
    domain = torch.tensor([2, 0, 2, 1, 0, 2, 2, 1, 0])
    weight, bias = torch.randn(3, 3, 4), torch.randn(3, 4)
    expected = torch.stack([x[i] @ weight[d] + bias[d] for i, d in enumerate(domain.tolist())])
    got = DomainGroups(domain, 3).linear(x, weight, bias)
    torch.testing.assert_close(got, expected)


def per_row_linear(groups: DomainGroups, x, weight, bias):
    return groups.linear(x, weight, bias)


def sorted_once_linear(groups: DomainGroups, x, weight, bias):
    """The path of a tower that keeps its rows in domain order (STAR)."""
    return groups.unsort(groups.sorted_linear(groups.sort(x), weight, bias))


@pytest.mark.parametrize("apply", [per_row_linear, sorted_once_linear])
@pytest.mark.parametrize(
    ("width", "out", "path"), [(8, 12, "grouped"), (3, 12, "dense"), (3, 33, "padded")]
)
def test_domain_groups_products_and_gradients_equal_a_loop_over_rows(width, out, path, apply):
    generator = torch.Generator().manual_seed(5)
    domain = torch.tensor([3, 0, 3, 1, 0, 3, 3, 1, 0, 3])  # domain 2 has no rows
    x = torch.randn(10, width, generator=generator, requires_grad=True)
    weight = torch.randn(4, width, out, generator=generator, requires_grad=True)
    bias = torch.randn(4, out, generator=generator, requires_grad=True)
    groups = DomainGroups(domain, 4)
    assert groups.product_path(x, weight) == path
    upstream = torch.randn(10, out, generator=generator)
    got = apply(groups, x, weight, bias)
    got_grads = torch.autograd.grad(got, (x, weight, bias), upstream)
    expected = torch.stack([x[i] @ weight[d] + bias[d] for i, d in enumerate(domain.tolist())])
    expected_grads = torch.autograd.grad(expected, (x, weight, bias), upstream)
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)
    assert got_grads[1][2].eq(0).all()  # the empty domain's weights get no gradient


@pytest.mark.parametrize("apply", [per_row_linear, sorted_once_linear])
def test_without_a_cpu_grouped_gemm_the_wide_layers_take_the_padded_path(monkeypatch, apply):
    """Torch releases before 2.13 may lack ``F.grouped_mm`` on the CPU."""
    from moe_mlora.models.multidomain import base

    monkeypatch.setattr(base, "cpu_grouped_mm_available", lambda: False)
    test_domain_groups_products_and_gradients_equal_a_loop_over_rows(8, 36, "padded", apply)


def test_sorting_rows_by_domain_and_back_moves_values_and_gradients_exactly():
    generator = torch.Generator().manual_seed(3)
    domain = torch.randint(0, 4, (50,), generator=generator)
    x = torch.randn(50, 6, generator=generator, requires_grad=True)
    upstream = torch.randn(50, 6, generator=generator)
    groups = DomainGroups(domain, 4)
    ordered = groups.sort(x)
    assert torch.equal(ordered, x[groups.order]) and torch.equal(groups.unsort(ordered), x)
    assert torch.equal(groups.domain_of_sorted, domain[groups.order])
    (got,) = torch.autograd.grad(groups.sort(x), x, upstream)
    (expected,) = torch.autograd.grad(x[groups.order], x, upstream)  # autograd's own scatter
    assert torch.equal(got, expected)
    (got,) = torch.autograd.grad(groups.unsort(x), x, upstream)
    (expected,) = torch.autograd.grad(x[torch.argsort(groups.order)], x, upstream)
    assert torch.equal(got, expected)


def test_a_multi_domain_tower_refuses_an_adapter():
    with pytest.raises(ValueError, match="takes no adapter"):
        build_model("deepfm", FIELDS, NUM_DOMAINS, {"kind": "mlora"}, tower={"kind": "ple"})
    with pytest.raises(ValueError, match=r"tower\.kind must be one of"):
        build_model("deepfm", FIELDS, NUM_DOMAINS, tower={"kind": "nosuch"})


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("method", TOWERS)
def test_each_baseline_completes_a_tiny_run_and_records_itself(method, cache_dir, tmp_path):
    results = train_and_evaluate(compose(tiny(cache_dir, f"method={method}")), tmp_path)
    assert results["run"]["method"] == method and results["schedule"]["name"] == method
    assert results["run"]["name"].endswith(f"-{method}-s123")
    assert results["parameters"]["adapter"] > 0  # its per-domain parts, counted apart
    flops = results["flops"]  # against the same backbone with its plain tower
    if method == "shared_bottom":  # the plain tower's shapes, each domain's row through its own
        assert flops["per_sample"] == flops["base_per_sample"]
    else:
        assert flops["base_per_sample"] < flops["per_sample"] and flops["overhead_pct"] > 0
    assert results["test"]["wauc"] > 0.5


@pytest.mark.parametrize(
    ("method", "kind", "widths"), [("mmoe_small", "mmoe", [64]), ("ple_small", "ple", [64, 64])]
)
def test_the_small_expert_variants_run_under_their_own_name(
    method, kind, widths, cache_dir, tmp_path
):
    cfg = compose(tiny(cache_dir, f"method={method}"))
    assert cfg.method.tower.kind == kind and list(cfg.method.tower.expert_units) == widths
    results = train_and_evaluate(cfg, tmp_path)
    assert results["run"]["method"] == method and results["schedule"]["name"] == method
    sparse, domain, _ = batch()
    flops = {}  # at the default tower widths (256-128-64), against the default variant
    for name in (method, kind):
        tower = OmegaConf.to_container(compose([f"method={name}"]).method.tower)
        net = build_model("deepfm", FIELDS, NUM_DOMAINS, tower=tower).eval()
        flops[name] = flops_per_sample(net, sparse, domain)
    assert flops[method] < 0.5 * flops[kind]


def test_a_baseline_on_another_backbone_completes_a_tiny_run(cache_dir, tmp_path):
    cfg = compose(tiny(cache_dir, "method=star", "model=dcn"))
    assert train_and_evaluate(cfg, tmp_path)["status"] == "completed"


@pytest.mark.parametrize("method", ["ple", "pepnet"])
def test_a_baseline_model_file_loads_with_its_tower_and_scores(method, cache_dir, tmp_path):
    from moe_mlora.serving import load_model, score

    train_and_evaluate(compose(tiny(cache_dir, f"method={method}")), tmp_path)
    served = load_model(tmp_path)  # every saved weight must fit the rebuilt model
    assert served.model.tower_config.kind == method
    rows = torch.zeros(6, len(served.fields), dtype=torch.int64)
    scores = score(served.model, rows, torch.arange(6) % served.num_domains)
    assert scores.shape == (6,) and ((scores > 0) & (scores < 1)).all()


@pytest.mark.parametrize("kind", TOWERS)
def test_a_traced_graph_serves_any_batch_size_and_domain_mix(kind):
    net = model(kind).eval()
    sparse, domain, _ = batch(n=80)
    with torch.no_grad():
        traced = torch.jit.trace(net, (sparse[:4], domain[:4]), check_trace=False)
        skewed = domain.clone()
        skewed[:60] = 3  # one domain holds most rows: another padding than when traced
        torch.testing.assert_close(traced(sparse, skewed), net(sparse, skewed))


def test_a_baseline_exports_to_onnx_and_matches(cache_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    import numpy as np
    import onnxruntime

    from moe_mlora.serving import load_model, score
    from moe_mlora.serving.export import export_model

    train_and_evaluate(compose(tiny(cache_dir, "method=ple", "trainer.max_epochs=1")), tmp_path)
    path = export_model(tmp_path, "onnx", tmp_path / "m.onnx")
    served = load_model(tmp_path)
    user = torch.arange(23) % len(served.vocabularies["user"])
    item = torch.arange(23) % len(served.vocabularies["item"])
    domain = torch.arange(23) % served.num_domains
    session = onnxruntime.InferenceSession(str(path))
    inputs = {"user": user.numpy(), "item": item.numpy(), "domain": domain.numpy()}
    got = session.run(None, inputs)[0]
    codes = torch.as_tensor(served.domain_feature_codes())[domain]
    want = score(served.model, torch.stack([user, item, codes], 1), domain)
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-5)


def star_norm(statistics: str, domain: torch.Tensor):
    """A STAR tower's partitioned normalisation in training mode, and an input for it."""
    torch.manual_seed(0)
    net = build_model(
        "deepfm", FIELDS, NUM_DOMAINS, tower={"kind": "star", "statistics": statistics}, **SMALL
    )
    x = torch.randn(
        len(domain), net.tower.norm.gamma.numel(), generator=torch.Generator().manual_seed(3)
    )
    x = x + domain.unsqueeze(1).float()  # domains differ in mean, as real domains do
    return net.tower.norm.train(), x


def test_star_normalises_a_mixed_batch_as_one_batch_per_domain():
    _, domain, _ = batch()
    norm, x = star_norm("domain", domain)
    together = norm(x, domain)
    for d in range(NUM_DOMAINS):
        rows = domain == d
        torch.testing.assert_close(together[rows], norm(x[rows], domain[rows]))
    whole_batch, _ = star_norm("batch", domain)
    assert not torch.allclose(whole_batch(x, domain), together, atol=1e-3)


def test_star_uses_the_moving_statistics_of_a_domain_with_one_row_in_the_batch():
    _, domain, _ = batch()
    norm, x = star_norm("domain", domain)
    norm.running_mean[4] = 2.0
    norm.running_var[4] = 4.0
    keep = torch.cat([torch.nonzero(domain != 4).squeeze(1), torch.tensor([4])])  # one row of 4
    out = norm(x[keep], domain[keep])
    expected = (x[4] - 2.0) / torch.sqrt(torch.tensor(4.0) + norm.eps)
    torch.testing.assert_close(out[-1], expected)
    assert norm.running_mean[4].eq(2.0).all()  # one row moves no statistics


def test_star_statistics_none_leaves_the_input_unnormalised_and_unknown_values_are_refused():
    _, domain, _ = batch()
    norm, x = star_norm("none", domain)
    torch.testing.assert_close(norm(x, domain), x)
    with pytest.raises(ValueError, match="statistics must be one of"):
        build_model(
            "deepfm", FIELDS, NUM_DOMAINS, tower={"kind": "star", "statistics": "x"}, **SMALL
        )


def test_star_global_statistics_train_on_the_batch_and_evaluate_on_its_moving_averages():
    from moe_mlora.models.multidomain.star import PartitionedNorm

    _, domain, _ = batch()
    x = torch.randn(len(domain), 6, generator=torch.Generator().manual_seed(4)) + domain[:, None]
    norm = PartitionedNorm(NUM_DOMAINS, 6, momentum=1.0, statistics="global").train()
    expected = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + norm.eps)
    torch.testing.assert_close(norm(x, domain), expected)
    torch.testing.assert_close(norm.eval()(x, domain), expected)  # one set for every domain


def test_keep_best_restores_the_best_epochs_moving_statistics_with_its_weights():
    from moe_mlora.training.callbacks import training_state
    from moe_mlora.training.phases import RunBest

    net = model("star").train()
    sparse, domain, _ = batch()
    state = training_state(net)
    assert any(t is net.tower.norm.running_mean for t in state)
    best = RunBest()
    net(sparse, domain)
    best.update(0.7, net, None)
    kept = net.tower.norm.running_mean.clone()
    net(*batch(seed=2)[:2])  # a later, worse epoch moves the statistics on
    assert not torch.equal(net.tower.norm.running_mean, kept)
    best.restore(net)
    assert torch.equal(net.tower.norm.running_mean, kept)


def test_best_weights_from_an_older_checkpoint_restore_the_parameters_it_holds():
    from moe_mlora.training.callbacks import BestWeights, training_state

    net = model("star")
    best = BestWeights("val/wauc")
    best._parameters = training_state(net)
    trainable = [p for p in net.parameters() if p.requires_grad]
    older = [torch.zeros_like(p) for p in trainable]  # such a checkpoint: parameters only
    best.load_state_dict({"best": 0.7, "best_epoch": 1, "best_metrics": None, "epochs": 2,
                          "wait": 0, "saved": older})  # fmt: skip
    statistics = net.tower.norm.running_mean.clone()
    best._restore_saved()
    assert all(p.eq(0).all() for p in trainable)
    assert torch.equal(net.tower.norm.running_mean, statistics)


@pytest.mark.parametrize(("option", "kept"), [("epnet", "ppnet"), ("ppnet", "epnet")])
def test_a_pepnet_ablation_keeps_only_the_other_part(option, kept):
    torch.manual_seed(0)
    tower = {"kind": "pepnet", option: False}
    net = build_model("deepfm", FIELDS, NUM_DOMAINS, tower=tower, **SMALL)
    assert getattr(net.tower, option) is None and getattr(net.tower, kept) is not None
    sparse, domain, label = batch()
    loss_of(net, sparse, domain, label).backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None]
    assert missing == [], f"no gradient reaches {missing}"
    with torch.no_grad():  # the part left still conditions the output on the domain
        before = net(sparse, domain)
        net.tower.domain_embedding.weight[2] += 1.0
        changed = net(sparse, domain) != before  # EPNet's effect is small at init
    assert changed[domain == 2].all() and not changed[domain != 2].any()


def test_a_pepnet_without_either_part_is_refused():
    tower = {"kind": "pepnet", "epnet": False, "ppnet": False}
    with pytest.raises(ValueError, match="needs ppnet, or epnet"):
        build_model("deepfm", FIELDS, NUM_DOMAINS, tower=tower, **SMALL)


@pytest.mark.parametrize(("method", "dropped"), [("ppnet", "epnet"), ("epnet", "ppnet")])
def test_the_pepnet_ablations_run_under_their_own_name(method, dropped, cache_dir, tmp_path):
    cfg = compose(tiny(cache_dir, f"method={method}"))
    assert cfg.method.tower.kind == "pepnet" and cfg.method.tower[dropped] is False
    results = train_and_evaluate(cfg, tmp_path)
    assert results["run"]["method"] == method and results["schedule"]["name"] == method
    assert results["parameters"]["adapter"] > 0


@pytest.mark.parametrize("scope", ["all", "tower"])
def test_epnet_scope_says_which_parts_read_the_gated_embeddings(scope):
    torch.manual_seed(0)
    tower = {"kind": "pepnet", "ppnet": False, "epnet_scope": scope}
    net = build_model("dcn", FIELDS, NUM_DOMAINS, tower=tower, **SMALL)
    seen = {}
    net.cross.register_forward_pre_hook(lambda _, args: seen.update(cross=args[0]))
    net.tower.register_forward_pre_hook(lambda _, args: seen.update(tower=args[0]))
    sparse, domain, _ = batch()
    with torch.no_grad():
        net(sparse, domain)
        raw = net.embeddings(sparse)
        gated = net.tower.embedding_gate(raw, domain).flatten(1)
    assert not torch.equal(raw.flatten(1), gated)
    torch.testing.assert_close(seen["tower"], gated)
    torch.testing.assert_close(seen["cross"], gated if scope == "all" else raw.flatten(1))


def test_an_unknown_epnet_scope_is_refused():
    with pytest.raises(ValueError, match="epnet_scope must be one of"):
        build_model("dcn", FIELDS, NUM_DOMAINS, tower={"kind": "pepnet", "epnet_scope": "x"})


def autograd_nodes(output: torch.Tensor) -> set[str]:
    """The names of every node in ``output``'s backward graph."""
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


@pytest.mark.parametrize("kind", [*TOWERS, "moe"])
@pytest.mark.parametrize("backbone", MODELS)
def test_no_backward_reads_rows_by_fancy_indexing(kind, backbone):
    """``t[index]``'s backward is an accumulating ``index_put_``: on the CPU its sums change
    with the thread schedule, so two runs with one seed would differ. Rows are read with
    ``index_select`` (backward ``index_add_``, in order) or a permutation instead."""
    torch.manual_seed(0)
    if kind == "moe":  # MoE-MLoRA's domain gate
        net = build_model(backbone, FIELDS, NUM_DOMAINS, AdapterConfig("moe", experts=4), **SMALL)
    else:
        net = build_model(backbone, FIELDS, NUM_DOMAINS, tower={"kind": kind}, **SMALL)
    sparse, domain, label = batch()
    assert "IndexBackward0" not in autograd_nodes(loss_of(net, sparse, domain, label))


@pytest.mark.parametrize("kind", ["shared_bottom", "ple"])
def test_gradients_are_the_same_on_every_pass_with_two_threads(kind):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        net = build_model("deepfm", FIELDS, NUM_DOMAINS, tower={"kind": kind}, dropout=0.0)
        sparse, domain, label = batch(n=4096)
        grads = []
        for _ in range(4):
            net.zero_grad()
            loss_of(net, sparse, domain, label).backward()
            grads.append([p.grad.clone() for p in net.parameters()])
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other, strict=True))


def test_mixing_experts_gives_the_plain_products_values_and_gradients_exactly():
    from moe_mlora.models.multidomain.mmoe import mix

    generator = torch.Generator().manual_seed(4)
    weights = torch.softmax(torch.randn(64, 3, generator=generator), -1).requires_grad_()
    experts = torch.randn(64, 3, 16, generator=generator, requires_grad=True)
    upstream = torch.randn(64, 16, generator=generator)
    got = mix(weights, experts)
    expected = torch.bmm(weights.unsqueeze(1), experts).squeeze(1)
    assert torch.equal(got, expected)
    got_grads = torch.autograd.grad(got, (weights, experts), upstream)
    expected_grads = torch.autograd.grad(expected, (weights, experts), upstream)
    assert all(torch.equal(g, e) for g, e in zip(got_grads, expected_grads, strict=True))
