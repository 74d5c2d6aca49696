"""The phase schedule: freezing, best weights, and parallel == sequential phase 2."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from moe_mlora.data.datamodule import MultiDomainDataModule
from moe_mlora.metrics import DomainAUC
from moe_mlora.models import AdapterConfig, build_model
from moe_mlora.pipeline.build import quiet_lightning
from moe_mlora.training.module import CTRModule, expert_mean_bce
from moe_mlora.training.phases import Schedule
from moe_mlora.training.schedules import load_schedule

PAPER = load_schedule("paper")


def make_trainer_factory(max_epochs: int):
    def make_trainer(phase, callbacks, reload):
        return L.Trainer(
            accelerator="cpu",
            max_epochs=max_epochs,
            logger=False,
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            reload_dataloaders_every_n_epochs=1 if reload else 0,
        )

    return make_trainer


@pytest.fixture(scope="module")
def datamodule(ml1m_root, tmp_path_factory) -> MultiDomainDataModule:
    quiet_lightning()
    dm = MultiDomainDataModule(
        "movielens",
        root=str(ml1m_root),
        split_by="gender",
        batch_size=512,
        cache_dir=tmp_path_factory.mktemp("cache"),
        progress=False,
    )
    dm.prepare()
    return dm


def make_module(dm, kind: str, experts: int | None = None, dropout: float = 0.5, seed: int = 0):
    torch.manual_seed(seed)
    data = dm.processed
    adapter = AdapterConfig(kind, experts=experts)
    model = build_model(
        "deepfm", data.fields, data.num_domains, adapter, hidden_units=(32, 16), dropout=dropout
    )
    return CTRModule(model, data.domain_names, lr=3e-3)


def snapshot(parameters) -> list[torch.Tensor]:
    return [p.detach().clone() for p in parameters]


def unchanged(parameters, saved) -> bool:
    return all(torch.equal(p, s) for p, s in zip(parameters, saved, strict=True))


def val_wauc(module: CTRModule, dm: MultiDomainDataModule) -> float:
    metric = DomainAUC(dm.num_domains)
    module.eval()
    with torch.inference_mode():
        for batch in dm.val_dataloader():
            metric.update(torch.sigmoid(module(batch)), batch["label"], batch["domain"])
    return metric.compute()["wauc"]


def test_expert_mean_bce_is_each_experts_own_mean():
    logits = torch.tensor([0.3, -1.0, 2.0, 0.5, -0.2])
    label = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    expert = torch.tensor([0, 0, 1, 1, 1])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = bce(logits[:2], label[:2]) + bce(logits[2:], label[2:])
    assert torch.allclose(expert_mean_bce(logits, label, expert), expected)


def test_moe_phases_freeze_whole_parameter_groups(datamodule):
    module = make_module(datamodule, "moe", experts=4)
    model = module.model
    schedule = Schedule(module, datamodule, make_trainer_factory(2), patience=2)
    groups = {
        "backbone": model.backbone_parameters(),
        "experts": model.expert_parameters(),
        "gate": model.gate_parameters(),
    }
    for index, spec in enumerate(PAPER.phases, start=1):
        (trained,) = spec.trains
        before = {name: snapshot(params) for name, params in groups.items()}
        report = schedule.run_phase(index, spec)
        assert report.epochs >= 1
        for name, params in groups.items():
            if name == trained:
                assert not unchanged(params, before[name]), f"{trained} phase must train {name}"
            else:
                assert unchanged(params, before[name]), f"{name} changed in the {trained} phase"


def test_best_weights_are_restored_at_phase_end(datamodule):
    module = make_module(datamodule, "none", seed=3)
    schedule = Schedule(
        module, datamodule, make_trainer_factory(6), spec=load_schedule("base"), patience=2
    )
    (report,) = schedule.run()
    assert report.best_epoch >= 0
    assert val_wauc(module, datamodule) == pytest.approx(report.best_val_wauc, abs=1e-6)


def test_mlora_trains_backbone_and_domain_adapters_jointly(datamodule):
    module = make_module(datamodule, "mlora")
    model = module.model
    backbone, adapters = snapshot(model.backbone_parameters()), snapshot(model.expert_parameters())
    (report,) = Schedule(
        module, datamodule, make_trainer_factory(1), spec=load_schedule("mlora")
    ).run()
    assert report.kind == "joint" and model.routing == "domain"
    assert not unchanged(model.backbone_parameters(), backbone)
    assert not unchanged(model.expert_parameters(), adapters)


@pytest.mark.parametrize("experts", [4, 1])
def test_parallel_phase2_equals_sequential(datamodule, experts):
    """All experts in one pass == one after another, each with its own optimizer.

    Dropout is off so both schedules draw no random masks; the backbone is
    trained first so that the experts start from a meaningful model.
    """
    module = make_module(datamodule, "moe", experts=experts, dropout=0.0, seed=7)
    Schedule(module, datamodule, make_trainer_factory(2), patience=2).run_phase(1, PAPER.phases[0])
    twin = copy.deepcopy(module)

    parallel_schedule = Schedule(module, datamodule, make_trainer_factory(5), patience=1)
    parallel = parallel_schedule.run_phase(2, PAPER.phases[1])
    sequential_schedule = Schedule(
        twin, datamodule, make_trainer_factory(5), patience=1, phase2_mode="sequential"
    )
    sequential = sequential_schedule.run_phase(2, PAPER.phases[1])

    for mine, theirs in zip(parallel.experts, sequential.experts, strict=True):
        assert mine["epochs"] == theirs["epochs"]
        assert mine["best_epoch"] == theirs["best_epoch"]
        assert mine["best_val_wauc"] == pytest.approx(theirs["best_val_wauc"], abs=1e-6)
    for e in range(experts):
        for p, q in zip(module.model.expert_tensors(e), twin.model.expert_tensors(e), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert parallel.train_samples == sequential.train_samples


def test_the_training_loss_is_logged_once_an_epoch_as_its_row_weighted_mean():
    """The step accumulates; only the epoch's last batch logs (Lightning's ``self.log`` is
    slow per call), the same row-weighted mean a per-step ``on_epoch`` log gave."""
    from types import SimpleNamespace

    from moe_mlora.data.processed import FieldSpec

    fields = [FieldSpec("user", 5), FieldSpec("domain", 3)]
    model = build_model("mlp", fields, 2, AdapterConfig(kind="none"), hidden_units=(4,))
    module = CTRModule(model, ["a", "b"])
    progress = SimpleNamespace(is_last_batch=False)
    module._trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(
        batch_progress=progress)))  # fmt: skip
    logged: list[tuple[str, float, dict]] = []
    module.log = lambda name, value, **kwargs: logged.append((name, float(value), kwargs))
    module.on_train_epoch_start()
    module._add_to_epoch_mean("phase1/train/loss", torch.tensor(1.0), 10)
    module._log_epoch_means_after_the_last_batch()
    assert logged == []  # not the last batch
    module._add_to_epoch_mean("phase1/train/loss", torch.tensor(4.0), 30)
    progress.is_last_batch = True
    module._log_epoch_means_after_the_last_batch()
    [(name, value, kwargs)] = logged
    assert name == "phase1/train/loss" and value == pytest.approx((10 * 1.0 + 30 * 4.0) / 40)
    assert kwargs["batch_size"] == 40 and kwargs["on_epoch"] and kwargs["sync_dist"]
    module.on_train_epoch_end()
    assert len(logged) == 1  # nothing left over to log twice


def test_a_batch_already_on_the_device_is_not_walked_again():
    from moe_mlora.data.processed import FieldSpec

    fields = [FieldSpec("user", 5), FieldSpec("domain", 3)]
    model = build_model("mlp", fields, 2, AdapterConfig(kind="none"), hidden_units=(4,))
    module = CTRModule(model, ["a", "b"])
    batch = {"sparse": torch.zeros(2, 2, dtype=torch.long), "label": torch.ones(2)}
    assert module.transfer_batch_to_device(batch, torch.device("cpu"), 0) is batch
    mixed = {**batch, "note": [1, 2]}  # not only tensors: Lightning's own transfer
    moved = module.transfer_batch_to_device(mixed, torch.device("cpu"), 0)
    assert moved is not mixed and moved["note"] == [1, 2]
