"""Schedules as data: every built-in schedule runs, and each mechanism does what it declares."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from test_run import tiny
from test_training import datamodule, make_module, make_trainer_factory, snapshot, unchanged

from moe_mlora.config import ConfigError, compose
from moe_mlora.data.batches import SingleDomainBatches
from moe_mlora.data.processed import SplitTensors
from moe_mlora.models import AdapterConfig, build_model
from moe_mlora.models.adapters import own_expert_routing
from moe_mlora.pipeline.runner import train_and_evaluate
from moe_mlora.pipeline.schema import final_validation
from moe_mlora.training.callbacks import BestWeights
from moe_mlora.training.phases import Schedule, set_trainable
from moe_mlora.training.schedules import (
    PhaseSpec,
    ScheduleError,
    ScheduleSpec,
    load_schedule,
    schedule_files,
)

__all__ = ["datamodule"]  # the module-scoped fixture, shared with test_training

# Test WAUC and log loss of a tiny run (tiny(), 3 epochs, no checkpoints) recorded with the
# code before schedules became data; the paper schedule (and base and MLoRA) must give the
# same numbers. Exact on one machine; 1e-9 leaves room only for a CPU with other kernels.
# That code drew dropout masks from uniform floats: dropout_mask=uniform.
PINNED = {
    "base": (0.7245086094302403, 0.6720377789308112),
    "mlora": (0.7180395266249967, 0.6608177082478063),
    "moe_mlora": (0.7188398905952075, 0.6696492427038522),
    "moe_mlora experts=3 method.phase2=sequential": (0.7282419612106442, 0.647796759547969),
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("key", sorted(PINNED))
def test_paper_base_and_mlora_schedules_reproduce_the_earlier_results_exactly(
    key, cache_dir, tmp_path
):
    method, *extra = key.split()
    overrides = tiny(
        cache_dir, f"method={method}", "trainer.max_epochs=3", "checkpoint=false",
        "dropout_mask=uniform",
    )  # fmt: skip
    if method == "moe_mlora":
        extra.append("method/schedule=paper")
    results = train_and_evaluate(compose([*overrides, *extra]), tmp_path)
    wauc, logloss = PINNED[key]
    assert results["test"]["wauc"] == pytest.approx(wauc, abs=1e-9)
    assert results["test"]["logloss"] == pytest.approx(logloss, abs=1e-9)
    expected = {"base": "base", "mlora": "mlora"}.get(method, "paper")
    assert results["schedule"]["name"] == expected


@pytest.mark.parametrize(
    "overrides",
    [
        ["method/schedule=warm"],
        ["method/schedule=warm", "experts_per_domain=2"],
        ["method/schedule=warm", "experts=3"],
        ["method/schedule=warm_gate_phase"],
        ["method/schedule=warm_no_finetune"],
        ["method/schedule=reference"],
        ["method/schedule=reference", "method.schedule.batches=single_domain", "experts=3"],
    ],
    ids=lambda o: " ".join(o),
)
def test_every_moe_schedule_composes_and_completes_a_tiny_run(overrides, cache_dir, tmp_path):
    results = train_and_evaluate(compose(tiny(cache_dir, *overrides)), tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    schedule = saved["schedule"]
    assert schedule["name"] == overrides[0].split("=")[1]
    assert [p["kind"] for p in saved["phases"]] == [p["name"] for p in schedule["phases"]]
    assert saved["run"]["schedule"] == schedule["name"]
    assert 0.5 < results["test"]["wauc"] <= 1.0
    diagnostics = saved["test"]["gate_diagnostics"]
    assert set(diagnostics["per_domain"]) == set(saved["test"]["per_domain"])
    if "batches=single_domain" in " ".join(overrides):
        assert {p["batches"] for p in schedule["phases"]} == {"single_domain"}


def test_every_built_in_schedule_file_parses():
    assert {"base", "mlora", "paper", "reference", "warm"} <= set(schedule_files())
    for name in schedule_files():
        assert load_schedule(name).name == name


@pytest.mark.parametrize(
    ("phase", "message"),
    [
        ({"name": "x", "routing": "gate", "trains": ["gate"]}, "routing must be one of"),
        ({"name": "x", "routing": "mixture", "trains": ["head"]}, "trains must be one of"),
        ({"name": "x", "routing": "off", "trains": ["experts"]}, "only the backbone"),
        ({"name": "x", "routing": "mixture", "trains": ["gate"], "lr": -1}, "lr must be"),
        ({"name": "x", "routing": "mixture", "trains": ["gate"], "speed": 2}, "unknown key"),
        (
            {
                "name": "x",
                "routing": "expert",
                "trains": ["experts"],
                "rows": "expert_domains",
                "best": "run",
            },
            "best: phase",
        ),
    ],
)
def test_a_bad_phase_is_refused_with_the_key_named(phase, message):
    with pytest.raises(ScheduleError, match=message):
        ScheduleSpec.from_mapping({"name": "mine", "phases": [phase]})


def test_a_schedule_needing_a_gate_is_refused_on_mlora_before_any_work(cache_dir, tmp_path):
    cfg = compose(tiny(cache_dir, "method=mlora", "method/schedule=warm"))
    with pytest.raises(ConfigError, match="cannot run schedule 'warm'"):
        train_and_evaluate(cfg, tmp_path)
    assert not (tmp_path / "results.json").exists()


# ---------------------------------------------------------------- the mechanisms, one by one
def moe_model(num_domains: int, experts: int, anchored: bool = False, seed: int = 0):
    from test_gate_and_complexity import FIELDS

    torch.manual_seed(seed)
    adapter = AdapterConfig("moe", experts=experts, gate={"anchored": anchored})
    return build_model("deepfm", FIELDS, num_domains, adapter, hidden_units=(16, 8)).eval()


def random_batch(num_domains: int, rows: int = 64):
    from test_gate_and_complexity import batch

    sparse, _ = batch(rows)
    return sparse, torch.arange(rows) % num_domains


def randomise_experts(model, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.expert_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


@pytest.mark.parametrize(("domains", "experts"), [(3, 3), (3, 6), (4, 2)])
def test_a_gate_at_own_experts_gives_exactly_the_domain_routed_model(domains, experts):
    """Step 0 of the warm schedule's fine-tuning is the phase-1 (domain-routed) model."""
    model = moe_model(domains, experts, anchored=True)
    randomise_experts(model)
    model.tower.adapter.gate.reset_near_uniform()  # a gate far from own experts...
    model.tower.adapter.gate.reset_to_own_experts()  # ...anchored back at them
    if experts > domains:  # copies of each domain's adapter, as the schedule makes them
        groups = [[e for e in range(experts) if e % domains == d] for d in range(domains)]
        for layer in model.tower.layers:
            layer.lora.spread(groups, 0.0, torch.Generator().manual_seed(0))
    sparse, domain = random_batch(domains)
    model.routing = "domain"
    routed = model(sparse, domain)
    model.routing = "mixture"
    mixed = model(sparse, domain)
    if experts > domains:  # 1/k x k equal copies: equal up to rounding
        torch.testing.assert_close(mixed, routed, rtol=0, atol=1e-6)
    else:
        assert torch.equal(mixed, routed)
    table = own_expert_routing(domains, experts)
    torch.testing.assert_close(model.gate_weights(sparse, domain), table[domain])


def test_spread_copies_average_to_the_domain_adapter_and_differ_from_each_other():
    model = moe_model(2, 6, anchored=True)
    randomise_experts(model)
    sparse, domain = random_batch(2)
    model.routing = "domain"  # each domain on its first expert, before the copies
    trained = model(sparse, domain)
    groups = [[0, 2, 4], [1, 3, 5]]
    for layer in model.tower.layers:
        layer.lora.spread(groups, 0.1, torch.Generator().manual_seed(0))
    model.tower.adapter.gate.reset_to_own_experts()
    model.routing = "mixture"  # 1/3 on each copy: their average is the first expert
    torch.testing.assert_close(model(sparse, domain), trained, rtol=0, atol=1e-5)
    bank = model.tower.layers[0].lora
    assert not torch.equal(bank.B[0], bank.B[2])
    assert torch.equal(bank.A[0], bank.A[4])


def test_experts_copied_from_mlora_adapters_reproduce_mlora_exactly():
    """MLoRA's trained model loaded into MoE-MLoRA (one expert per domain, gate at own)."""
    from test_gate_and_complexity import FIELDS

    domains = 3
    torch.manual_seed(0)
    mlora = build_model("deepfm", FIELDS, domains, AdapterConfig("mlora"), hidden_units=(16, 8))
    randomise_experts(mlora)
    mlora.eval()
    moe = moe_model(domains, domains, anchored=True, seed=5)
    missing, unexpected = moe.load_state_dict(mlora.state_dict(), strict=False)
    assert not unexpected and all(".adapter.gate." in key for key in missing)
    moe.tower.adapter.gate.reset_to_own_experts()
    sparse, domain = random_batch(domains)
    assert torch.equal(moe(sparse, domain), mlora(sparse, domain))


# ---------------------------------------------------------------- keep-best, revert, freezing
class FakeTrainer:
    def __init__(self) -> None:
        self.sanity_checking = False
        self.should_stop = False
        self.current_epoch = 0
        self.callback_metrics: dict = {}


def epochs_of(callback: BestWeights, parameter: torch.nn.Parameter, scores: list[float]):
    """Drive the callback through epochs: each 'trains' the weight to the epoch's number."""
    trainer, module = FakeTrainer(), torch.nn.Module()
    module.weight = parameter
    callback.on_fit_start(trainer, module)
    seen = []
    for epoch, score in enumerate(scores):
        with torch.no_grad():
            parameter.fill_(float(epoch + 1))
        trainer.current_epoch, trainer.callback_metrics = epoch, {"m": torch.tensor(score)}
        callback.on_validation_end(trainer, module)
        seen.append(float(parameter.detach()))
        if trainer.should_stop:
            break
    callback.on_fit_end(trainer, module)
    return seen


def test_revert_restores_the_best_weights_after_an_epoch_that_does_not_improve():
    weight = torch.nn.Parameter(torch.zeros(()))
    callback = BestWeights("m", patience=3, revert=True)
    seen = epochs_of(callback, weight, [0.6, 0.7, 0.65, 0.8, 0.75, 0.7, 0.7])
    # after epoch 3 (0.65) the weights of epoch 2 (0.7) come back; after 5 and 6, epoch 4's
    assert seen == [1.0, 2.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert callback.reverted == 4 and callback.best == pytest.approx(0.8)
    assert float(weight.detach()) == 4.0


def test_without_revert_training_goes_on_from_the_last_epoch():
    weight = torch.nn.Parameter(torch.zeros(()))
    seen = epochs_of(BestWeights("m", patience=3), weight, [0.6, 0.7, 0.65, 0.66])
    assert seen == [1.0, 2.0, 3.0, 4.0]
    assert float(weight.detach()) == 2.0  # the best epoch's weights at the end


def test_a_run_wide_best_phase_that_never_beats_the_run_hands_back_the_runs_weights():
    weight = torch.nn.Parameter(torch.zeros(()))
    restored = []

    def fallback() -> None:
        with torch.no_grad():
            restored.append(weight.fill_(-1.0))

    callback = BestWeights("m", patience=2, to_beat=0.9, fallback=fallback)
    epochs_of(callback, weight, [0.8, 0.85, 0.7])
    assert not callback.improved and restored
    assert float(weight.detach()) == -1.0
    assert callback.seen_best == pytest.approx(0.85)


def test_keep_best_never_ends_below_the_best_phase(datamodule):
    """The warm schedule's final model scores its run's best validation WAUC, whatever the
    later phases did (here: a fine-tuning phase at a harmful learning rate)."""
    from test_training import val_wauc

    spec = harmful_warm()
    anchored = anchored_module(datamodule)
    schedule = Schedule(anchored, datamodule, make_trainer_factory(3), spec=spec, patience=2)
    reports = schedule.run()
    best_phase = max(r.best_score for r in reports if r.kept)
    assert val_wauc(anchored, datamodule) == pytest.approx(best_phase, abs=1e-6)
    assert val_wauc(anchored, datamodule) >= max(r.best_val_wauc for r in reports) - 1e-6
    assert not reports[2].kept  # lr 0.5 wrecks the model: the run's best came back


def harmful_warm() -> ScheduleSpec:
    """warm plus a last run-wide-best phase at a learning rate that wrecks the model."""
    warm = load_schedule("warm")
    harmful = PhaseSpec("harmful", "mixture", ("backbone", "experts", "gate"), lr=0.5, best="run")
    return ScheduleSpec("warm_harmful", (*warm.phases, harmful), adapters=("moe",))


@pytest.mark.parametrize("name", ["warm_harmful", "paper", "reference"])
def test_recorded_validation_is_the_tested_models(datamodule, name):
    """results.json's ``validation`` (derived from the phases) is the validation WAUC of the
    model the run ends with: the last phase's best under per-phase best weights (paper), an
    earlier phase's when the last was not kept (warm_harmful), the run's best (reference)."""
    from test_training import val_wauc

    spec = harmful_warm() if name == "warm_harmful" else load_schedule(name)
    module = anchored_module(datamodule)
    schedule = Schedule(module, datamodule, make_trainer_factory(2), spec=spec, patience=1)
    phases = [report.to_json() for report in schedule.run()]
    recorded = final_validation(phases)
    assert recorded["wauc"] == pytest.approx(val_wauc(module, datamodule), abs=1e-6)
    if name == "warm_harmful":
        assert phases[-1]["kept"] is False and recorded["wauc"] != phases[-1]["best_val_wauc"]


def anchored_module(dm):
    from moe_mlora.training.module import CTRModule

    torch.manual_seed(0)
    data = dm.processed
    adapter = AdapterConfig("moe", experts=2, gate={"anchored": True})
    model = build_model("deepfm", data.fields, data.num_domains, adapter, hidden_units=(32, 16))
    return CTRModule(model, data.domain_names, lr=3e-3)


@pytest.mark.parametrize("name", ["warm", "warm_gate_phase", "reference"])
def test_parameters_a_phase_declares_frozen_are_bit_identical_after_it(datamodule, name):
    module = anchored_module(datamodule)
    model = module.model
    groups = {
        "backbone": model.backbone_parameters(),
        "experts": model.expert_parameters(),
        "gate": model.gate_parameters(),
    }
    schedule = Schedule(
        module, datamodule, make_trainer_factory(2), spec=load_schedule(name), patience=1
    )
    for index, spec in enumerate(schedule.spec.phases, start=1):
        schedule._initialise(spec)  # inits change weights by design; the phase must not
        before = {group: snapshot(params) for group, params in groups.items()}
        schedule.run_phase(index, PhaseSpec(**{**spec.to_json(), "init": ()}))
        for group, params in groups.items():
            if group not in spec.trains:
                assert unchanged(params, before[group]), f"{group} changed in {spec.name}"


def test_each_expert_rows_fit_once_per_expert_on_its_domains(datamodule):
    module = make_module(datamodule, "moe", experts=2)
    spec = load_schedule("reference")
    schedule = Schedule(module, datamodule, make_trainer_factory(2), spec=spec, patience=1)
    schedule.run_phase(1, spec.phases[0])
    report = schedule.run_phase(2, spec.phases[1])
    names = datamodule.domain_names
    assert [e["domains"] for e in report.experts] == [[names[0]], [names[1]]]
    assert report.epochs == sum(e["epochs"] for e in report.experts)
    train_rows = len(datamodule.processed.splits["train"])
    assert report.train_samples == pytest.approx(train_rows * report.epochs / 2, rel=0.5)


def test_carried_optimizer_state_continues_adam(datamodule):
    module = make_module(datamodule, "moe", experts=2)
    spec = load_schedule("reference")
    schedule = Schedule(module, datamodule, make_trainer_factory(1), spec=spec, patience=1)
    schedule.run_phase(1, spec.phases[0])
    positions, state = module.carried_optimizer
    steps = float(next(iter(state["state"].values()))["step"])
    assert steps == len(datamodule.train_dataloader())
    set_trainable(module.model, True, True, False)
    module.phase = copy.copy(module.phase)
    optimizer = module.configure_optimizers()
    assert float(next(iter(optimizer.state_dict()["state"].values()))["step"]) == steps
    assert positions == module._trainable_positions()


# ---------------------------------------------------------------- single-domain batches
def test_single_domain_batches_never_mix_domains_and_cover_every_row_once():
    domain = torch.tensor([0] * 7 + [1] * 5 + [2] * 3)
    split = SplitTensors(torch.arange(15)[:, None], domain, torch.zeros(15))
    batches = SingleDomainBatches(split, batch_size=3, seed=1)
    assert len(batches) == 3 + 2 + 1
    first = list(batches)
    assert all(len(torch.unique(b["domain"])) == 1 for b in first)
    rows = torch.cat([b["sparse"][:, 0] for b in first])
    assert sorted(rows.tolist()) == list(range(15))
    order = [int(b["domain"][0]) for b in first]
    second = [int(b["domain"][0]) for b in batches]  # a new epoch: a new order
    assert sorted(order) == sorted(second)
    assert [
        list(SingleDomainBatches(split, 3, seed=1))[i]["sparse"].tolist() for i in range(6)
    ] == [b["sparse"].tolist() for b in first]


def test_gate_diagnostics_report_own_expert_weight_and_entropy(cache_dir, tmp_path):
    cfg = compose(tiny(cache_dir, "method/schedule=warm", "experts_per_domain=2"))
    results = train_and_evaluate(cfg, tmp_path)
    diagnostics = results["test"]["gate_diagnostics"]
    weights = results["test"]["gate_weights"]
    domains = list(weights)
    for d, name in enumerate(domains):
        row = diagnostics["per_domain"][name]
        own = sum(weights[name][e] for e in range(len(weights[name])) if e % len(domains) == d)
        assert row["own_weight"] == pytest.approx(own, abs=1e-6)
        assert 0.0 <= row["entropy"] <= math.log(len(weights[name])) + 1e-6


def test_the_warm_schedules_first_phase_is_exactly_an_mlora_run(cache_dir, tmp_path):
    """One expert per domain: same init, batches, dropout and updates as method=mlora."""
    common = tiny(cache_dir, "checkpoint=false")
    mlora = train_and_evaluate(compose([*common, "method=mlora"]), tmp_path / "mlora")
    warm = train_and_evaluate(compose([*common, "method/schedule=warm"]), tmp_path / "warm")
    assert warm["phases"][0]["best_val_wauc"] == mlora["phases"][0]["best_val_wauc"]
    assert warm["phases"][0]["epochs"] == mlora["phases"][0]["epochs"]
    kept = [phase["best_score"] for phase in warm["phases"] if phase["kept"]]
    assert max(kept) >= mlora["phases"][0]["best_val_wauc"]  # later phases only add


# ---------------------------------------------------------------- reference hyperparameters
@pytest.mark.parametrize(
    ("model", "data", "reduce"),
    [("deepfm", "taobao20", 256), ("dcn", "taobao20", 16), ("nfm", "movielens_age", 4),
     ("xdeepfm", "movielens_gender", 32), ("wdl", "synthetic", 16), ("mlp", "taobao20", 32)],
)  # fmt: skip
def test_reference_hparams_recipe_sets_lora_reduce_per_backbone_and_data(model, data, reduce):
    cfg = compose([f"model={model}", f"data={data}", "experiment=reference_hparams"])
    assert cfg.method.adapter.lora_reduce == reduce
    taobao = data.startswith("taobao")
    assert cfg.model.embedding_dim == (128 if taobao else 8)
    assert cfg.data.project_pretrained is (not taobao)


def test_taobao_at_full_width_feeds_the_vectors_as_they_are(cache_dir, tmp_path):
    overrides = [
        "data=taobao10",
        "data.generate_if_missing=true",
        "data.generator.clicks=3000",
        "data.generator.users=300",
        "data.generator.items=200",
        "data.generator.themes=10",
        "model.hidden_units=[16]",
        "trainer.max_epochs=1",
        "method/schedule=warm",
        "experiment=reference_hparams",
        "logger.wandb.enabled=false",
        "progress=false",
        f"paths.cache_dir={cache_dir}",
    ]
    results = train_and_evaluate(compose(overrides), tmp_path)
    assert results["hyperparameters"] == {
        "lora_reduce": 256,
        "lora_rank": None,
        "embedding_dim": 128,
        "project_pretrained": False,
        "freeze_pretrained": True,
        "max_epochs": 1,
    }
    from moe_mlora.serving import load_model

    model = load_model(tmp_path / "model.pt").model
    user = model.embeddings.tables[0]
    assert isinstance(user.proj, torch.nn.Identity)
    assert model.tower.layers[0].linear.in_features == 3 * 128  # user + item + domain


def test_full_width_with_a_narrow_embedding_is_a_clear_error():
    from moe_mlora.models.features import PretrainedEmbedding

    with pytest.raises(ValueError, match=r"set model\.embedding_dim=128"):
        PretrainedEmbedding(torch.zeros(5, 128), 8, project=False)


@pytest.mark.parametrize("name", ["warm", "reference"])
def test_a_run_crashed_before_its_last_phase_resumes_to_the_same_result(
    name, cache_dir, tmp_path, monkeypatch
):
    """The run-wide best and the carried Adam state travel in the phase checkpoints."""
    overrides = tiny(cache_dir, f"method/schedule={name}", "trainer.max_epochs=3")
    uninterrupted = train_and_evaluate(compose(overrides), tmp_path / "once")
    last = len(load_schedule(name).phases)
    real_phase = Schedule.run_phase

    def crash_at_the_last_phase(self, index, spec):
        if index == last:
            raise RuntimeError("simulated crash")
        return real_phase(self, index, spec)

    monkeypatch.setattr(Schedule, "run_phase", crash_at_the_last_phase)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_and_evaluate(compose(overrides), tmp_path / "twice")
    monkeypatch.undo()
    resumed = train_and_evaluate(compose(overrides), tmp_path / "twice")
    assert resumed["test"] == uninterrupted["test"]
    assert [p["kept"] for p in resumed["phases"]] == [p["kept"] for p in uninterrupted["phases"]]


def test_mlora_finetune_control_starts_as_mlora_and_never_ends_below_it(cache_dir, tmp_path):
    common = tiny(cache_dir, "checkpoint=false", "method=mlora")
    mlora = train_and_evaluate(compose(common), tmp_path / "mlora")
    tuned = train_and_evaluate(
        compose([*common, "method/schedule=mlora_finetune"]), tmp_path / "tuned"
    )
    assert tuned["phases"][0]["best_val_wauc"] == mlora["phases"][0]["best_val_wauc"]
    kept = [phase["best_score"] for phase in tuned["phases"] if phase["kept"]]
    assert max(kept) >= mlora["phases"][0]["best_val_wauc"]
