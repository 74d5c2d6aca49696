"""Data-parallel (DDP) runs: sharding without duplicates, exact evaluation, the three phases.

The two-process tests use CPU processes and gloo: ``mp.spawn`` starts two workers that set
the rank variables a DDP launcher would set (``LOCAL_RANK``...), so Lightning's DDP
strategy joins them instead of re-running pytest; and one end-to-end run goes through the
command line, where Lightning's own launcher starts the second process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from test_run import tiny

from moe_mlora.config import ConfigError, compose
from moe_mlora.data import batches as batches_module
from moe_mlora.data.batches import (
    ExpertBatches,
    ExpertEvalBatches,
    SplitBatches,
    expert_assignment,
)
from moe_mlora.data.processed import SplitTensors
from moe_mlora.pipeline.build import build_module, quiet_lightning
from moe_mlora.pipeline.runner import train_and_evaluate
from moe_mlora.sweep import config_fingerprint
from moe_mlora.training.checkpoints import RunCheckpoints
from moe_mlora.training.module import (
    CTRModule,
    Phase,
    batch_mean_bce,
    expert_mean_bce,
    sharded_expert_mean_bce,
)
from moe_mlora.training.phases import Schedule
from moe_mlora.training.schedules import load_schedule

PAPER = load_schedule("paper")

REPO = Path(__file__).resolve().parents[1]
WORLD = 2


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


# ------------------------------------------------------------- sharding, one process
def make_split(n: int, domains: int = 3) -> SplitTensors:
    g = torch.Generator().manual_seed(0)
    return SplitTensors(
        sparse=torch.arange(n).unsqueeze(1).repeat(1, 2),
        domain=torch.randint(0, domains, (n,), generator=g),
        label=torch.randint(0, 2, (n,), generator=g).float(),
    )


def per_rank(monkeypatch, world: int, make) -> list[list[dict]]:
    """Every rank's batches of one epoch, as if this process had each rank in turn."""
    out = []
    for rank in range(world):
        monkeypatch.setattr(batches_module, "process_slot", lambda r=rank: (r, world))
        loader = make()
        out.append((len(loader), list(loader)))
    monkeypatch.setattr(batches_module, "process_slot", lambda: (0, 1))
    lengths = {length for length, _ in out}
    assert len(lengths) == 1, f"ranks disagree on the number of steps: {lengths}"
    assert all(len(batches) == length for length, batches in out)
    return [batches for _, batches in out]


def rows(*batches: dict) -> list[int]:
    """The split rows the batches hold, in order."""
    return torch.cat([batch["sparse"][:, 0] for batch in batches]).tolist()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [1000, 1025, 1026])  # 1025, 1026: a last batch of 1 or 2 rows
def test_training_shards_are_disjoint_parts_of_the_global_batch(monkeypatch, world, n):
    split = make_split(n)
    single = list(SplitBatches(split, 128, shuffle=True, seed=5))
    ranks = per_rank(monkeypatch, world, lambda: SplitBatches(split, 128, shuffle=True, seed=5))
    last = n - 128 * (len(single) - 1)
    expected_steps = len(single) - (last < world)  # a last batch smaller than world is dropped
    assert len(ranks[0]) == expected_steps
    for step in range(expected_steps):
        parts = [ranks[r][step] for r in range(world)]
        assert rows(*parts) == rows(single[step])
        sizes = [len(rows(p)) for p in parts]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        assert all(int(p["global_rows"]) == len(rows(single[step])) for p in parts)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [999, 1000, 131073])
def test_evaluation_shards_cover_every_row_once_in_equal_step_counts(monkeypatch, world, n):
    split = make_split(n)
    ranks = per_rank(monkeypatch, world, lambda: SplitBatches(split, 65536, shard="rows"))
    assert rows(*(b for batches in ranks for b in batches)) == list(range(n))
    assert all(len(rows(b)) <= 65536 for batches in ranks for b in batches)
    assert all("global_rows" not in b for batches in ranks for b in batches)


@pytest.mark.parametrize("world", [2, 3])
def test_phase2_batches_shard_and_tell_the_global_rows_per_expert(monkeypatch, world):
    split = make_split(1000, domains=3)
    assignment = expert_assignment(4, 3)
    single = list(ExpertBatches(split, assignment, 100, seed=3))
    ranks = per_rank(monkeypatch, world, lambda: ExpertBatches(split, assignment, 100, seed=3))
    assert len(ranks[0]) == len(single)
    for step, whole in enumerate(single):
        parts = [ranks[r][step] for r in range(world)]
        assert rows(*parts) == rows(whole)
        assert torch.equal(torch.cat([p["expert"] for p in parts]), whole["expert"])
        counts = torch.bincount(whole["expert"], minlength=len(assignment))
        assert all(torch.equal(p["global_rows"], counts) for p in parts)

    evaluation = list(ExpertEvalBatches(split, assignment, 300))
    ranks = per_rank(monkeypatch, world, lambda: ExpertEvalBatches(split, assignment, 300))
    flat = [b for batches in ranks for b in batches]
    assert rows(*flat) == rows(*evaluation)
    assert torch.equal(
        torch.cat([b["expert"] for b in flat]), torch.cat([b["expert"] for b in evaluation])
    )


def test_sharded_losses_average_to_the_single_process_loss():
    """DDP averages the ranks' gradients; the ranks' losses must average to the global one."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(101, generator=g, requires_grad=True)
    label = torch.randint(0, 2, (101,), generator=g).float()
    expert = torch.randint(0, 4, (101,), generator=g)
    bounds = [(0, 20), (20, 101)]  # uneven shards: experts spread unevenly over the ranks
    world, global_rows = torch.tensor(2), torch.bincount(expert, minlength=4)

    def averaged(loss_of_shard) -> torch.Tensor:
        return sum(loss_of_shard(slice(a, b)) for a, b in bounds) / len(bounds)

    expected = expert_mean_bce(logits, label, expert)
    got = averaged(
        lambda s: sharded_expert_mean_bce(logits[s], label[s], expert[s], global_rows, world)
    )
    (grad_expected,) = torch.autograd.grad(expected, logits)
    (grad_got,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grad_got, grad_expected)

    keys = {"global_rows": torch.tensor(101), "world_size": world}
    got = averaged(lambda s: batch_mean_bce(logits[s], label[s], keys))
    torch.testing.assert_close(got, batch_mean_bce(logits, label, {}))


# ------------------------------------------------------------------- config errors
def test_more_devices_than_available_is_a_config_error(cache_dir):
    cfg = compose(tiny(cache_dir, "trainer=ddp", "trainer.devices=4096", "trainer.accelerator=cpu"))
    with pytest.raises(ConfigError, match=r"trainer\.devices=4096 asks for 4096 devices") as info:
        train_and_evaluate(cfg, cache_dir / "never")
    assert "CPU cores" in str(info.value)
    assert not (cache_dir / "never").exists(), "checked before anything is built"


def test_spawning_strategies_are_refused(cache_dir):
    cfg = compose(tiny(cache_dir, "trainer=ddp", "trainer.strategy=ddp_spawn"))
    with pytest.raises(ConfigError, match=r"trainer\.strategy=ddp_spawn is not supported"):
        train_and_evaluate(cfg, cache_dir / "never")


# ----------------------------------------------------------- two processes (gloo)
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build(cfg):
    datamodule = instantiate(
        cfg.data, shuffle_seed=int(cfg.seed), cache_dir=cfg.paths.cache_dir, progress=False
    )
    datamodule.prepare()
    torch.manual_seed(int(cfg.seed))
    return datamodule, build_module(cfg, datamodule)


def make_trainer_factory(cfg):
    from moe_mlora.pipeline.trainer import trainer_factory

    return trainer_factory(cfg, [])


def evaluate(cfg, module, datamodule) -> dict:
    """Validation on all domains (gate routing), phase 2's per-expert validation, test."""
    make_trainer = make_trainer_factory(cfg)
    model = module.model
    model.routing, module.phase = "mixture", Phase(3, PAPER.phases[2])
    make_trainer(module.phase, [], False).validate(
        module, dataloaders=datamodule.val_dataloader(), verbose=False
    )
    val = module.last_val
    assignment = expert_assignment(model.num_experts, datamodule.num_domains)
    model.routing, module.phase = "expert", Phase(2, PAPER.phases[1], assignment)
    make_trainer(module.phase, [], False).validate(
        module, dataloaders=datamodule.expert_val_batches(assignment), verbose=False
    )
    experts = module.last_expert_val.clone()
    model.routing = "mixture"
    test = Schedule(module, datamodule, make_trainer).test()
    return {"val": val, "experts": experts, "test": test}


def _worker(rank: int, port: int, cache_dir: str, weights: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        WORLD_SIZE=str(WORLD),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    quiet_lightning()
    cfg = compose(
        tiny(
            Path(cache_dir),
            "trainer=ddp",
            f"trainer.devices={WORLD}",
            "trainer.accelerator=cpu",
            "method/schedule=paper",
        )
    )
    datamodule, module = build(cfg)
    module.model.load_state_dict(torch.load(weights))
    torch.save(evaluate(cfg, module, datamodule), f"{out}/eval.{rank}")

    # The three phases under DDP, with checkpoints (rank 0 writes, the others wait) ...
    torch.save(train_ddp(cfg, Path(out) / "run"), f"{out}/train.{rank}")
    # ... and again, interrupted in phase 2 after its first epoch, then resumed.
    with pytest.raises(Interrupted):
        train_ddp(cfg, Path(out) / "resumed", interrupt=True)
    torch.save(train_ddp(cfg, Path(out) / "resumed"), f"{out}/resumed.{rank}")


class Interrupted(Exception):
    """Stands for a kill: raised on every rank at the same point."""


class InterruptPhase2(L.Callback):
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        if pl_module.phase.kind == "experts" and trainer.current_epoch == 1:
            raise Interrupted


def train_ddp(cfg, run_dir: Path, interrupt: bool = False) -> dict:
    """MoE-MLoRA's phases and the test from a fresh, seeded module, with checkpoints."""
    datamodule, module = build(cfg)
    make_trainer = make_trainer_factory(cfg)
    if interrupt:
        plain = make_trainer

        def make_trainer(phase, callbacks, reload):
            return plain(phase, [InterruptPhase2(), *callbacks], reload)

    checkpoints = RunCheckpoints(run_dir, config_fingerprint(cfg))
    schedule = Schedule(module, datamodule, make_trainer, spec=PAPER, checkpoints=checkpoints)
    reports = [report.to_json() for report in schedule.run()]
    test = schedule.test()
    state = {k: v.clone() for k, v in module.model.state_dict().items()}
    return {"reports": reports, "test": test, "state": state}


def assert_same_metrics(got: dict, expected: dict) -> None:
    for key in ("wauc", "mean_auc", "auc", "logloss"):
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key
    torch.testing.assert_close(
        got["auc_per_domain"], expected["auc_per_domain"], atol=1e-6, rtol=0, equal_nan=True
    )
    assert torch.equal(got["count_per_domain"], expected["count_per_domain"])
    assert torch.equal(got["positives_per_domain"], expected["positives_per_domain"])


@pytest.mark.slow
def test_two_processes_evaluate_exactly_like_one_and_train_identically(cache_dir, tmp_path):
    import torch.multiprocessing as mp

    quiet_lightning()
    cfg = compose(
        tiny(cache_dir, "trainer.accelerator=cpu", "trainer.max_epochs=1", "method/schedule=paper")
    )
    datamodule, module = build(cfg)
    Schedule(module, datamodule, make_trainer_factory(cfg), spec=PAPER).run()  # trained weights
    weights = tmp_path / "weights.pt"
    torch.save(module.model.state_dict(), weights)
    single = evaluate(cfg, module, datamodule)

    args = (_free_port(), str(cache_dir), str(weights), str(tmp_path))
    mp.spawn(_worker, args=args, nprocs=WORLD, join=True)

    for rank in range(WORLD):
        got = torch.load(tmp_path / f"eval.{rank}", weights_only=False)
        assert_same_metrics(got["val"], single["val"])
        assert_same_metrics(got["test"], single["test"])
        torch.testing.assert_close(got["experts"], single["experts"], atol=1e-6, rtol=0)
        torch.testing.assert_close(got["test"]["gate_weights"], single["test"]["gate_weights"])

    # Training: every rank stopped at the same epochs and ended with the same weights, and
    # a run interrupted in phase 2 and resumed ends exactly like the uninterrupted one.
    trained = [torch.load(tmp_path / f"train.{r}", weights_only=False) for r in range(WORLD)]
    resumed = [torch.load(tmp_path / f"resumed.{r}", weights_only=False) for r in range(WORLD)]
    assert [r["kind"] for r in trained[0]["reports"]] == ["backbone", "experts", "gate"]
    for other in [*trained[1:], *resumed]:
        for mine, theirs in zip(trained[0]["reports"], other["reports"], strict=True):
            for key in ("epochs", "best_epoch", "best_val_wauc", "experts", "best_val"):
                assert mine[key] == theirs[key], key
        for name, value in trained[0]["state"].items():
            assert torch.equal(value, other["state"][name]), name
        assert_same_metrics(other["test"], trained[0]["test"])
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "phase1.pt",
        "phase2.pt",
        "phase3.pt",
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("schedule", "phases"),
    [("paper", ["backbone", "experts", "gate"]), ("warm", ["joint", "finetune"])],
)
def test_command_line_ddp_run_completes_close_to_one_process(cache_dir, tmp_path, schedule, phases):
    """``python -m moe_mlora.run trainer=ddp``: Lightning re-runs the command for rank 1."""
    overrides = tiny(
        cache_dir, "method=moe_mlora", f"method/schedule={schedule}", "trainer.accelerator=cpu"
    )
    single = train_and_evaluate(compose(overrides), tmp_path / "single")

    command = [sys.executable, "-m", "moe_mlora.run", *overrides]
    command += ["trainer=ddp", f"trainer.devices={WORLD}", "threads=1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LOCAL_RANK", None)
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = list((tmp_path / "outputs").rglob("results.json"))
    assert len(found) == 1, found  # both ranks ran in one folder; one wrote
    run_dir = found[0].parent
    assert (run_dir / "model.pt").is_file()
    assert (run_dir / f"train_ddp_process_{WORLD - 1}.log").is_file()
    assert not (run_dir / "checkpoints").exists()
    assert done.stdout.count("results: ") == 1  # the summary is printed once
    results = json.loads(found[0].read_text())
    assert [p["kind"] for p in results["phases"]] == phases
    test = results["test"]
    assert (
        sum(d["samples"] for d in test["per_domain"].values()) == results["data"]["test"]["samples"]
    )
    assert test["wauc"] == pytest.approx(single["test"]["wauc"], abs=0.02)


# ------------------------------------------------- moving statistics (STAR's normalisation)
def _average_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from moe_mlora.distributed import average_running_statistics
    from moe_mlora.models.multidomain.star import PartitionedNorm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    norm = PartitionedNorm(3, 4)
    norm.running_mean.fill_(float(rank))  # each process moved them with its own shard
    norm.running_var.fill_(1.0 + 2 * rank)
    norm.register_buffer("counts", torch.full((3,), rank))  # not floating point: left alone
    norm.register_buffer("table", torch.arange(4.0) + rank)  # not a running_ buffer: left alone
    average_running_statistics(norm)
    torch.save({name: b.clone() for name, b in norm.named_buffers()}, f"{out}/buffers.{rank}")
    dist.destroy_process_group()


def test_moving_statistics_are_averaged_over_the_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_average_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        buffers = torch.load(tmp_path / f"buffers.{rank}")
        assert torch.equal(buffers["running_mean"], torch.full((3, 4), 0.5))
        assert torch.equal(buffers["running_var"], torch.full((3, 4), 2.0))
        assert torch.equal(buffers["counts"], torch.full((3,), rank))
        assert torch.equal(buffers["table"], torch.arange(4.0) + rank)


def test_every_evaluation_starts_from_statistics_every_process_shares(monkeypatch):
    """Validation (which picks the best epoch) and test average them first; in a single
    process that leaves them as they are."""
    from moe_mlora.data.processed import FieldSpec
    from moe_mlora.distributed import average_running_statistics
    from moe_mlora.models import build_model
    from moe_mlora.training import module as module_file

    fields = [FieldSpec("user", 5), FieldSpec("domain", 3)]
    model = build_model("mlp", fields, 2, tower={"kind": "star"}, hidden_units=(4,))
    model.tower.norm.running_mean.fill_(0.25)
    average_running_statistics(model)
    assert torch.equal(
        model.tower.norm.running_mean, torch.full_like(model.tower.norm.running_mean, 0.25)
    )
    averaged = []
    monkeypatch.setattr(module_file, "average_running_statistics", averaged.append)
    module = CTRModule(model, ["a", "b"])
    module.on_validation_epoch_start()
    module.on_test_epoch_start()
    assert averaged == [model, model]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["star", "mmoe", "pepnet", "mlora"])
def test_ddp_run_validates_and_saves_one_model(cache_dir, tmp_path, method):
    """Two processes train ``method``: the best validation WAUC and the test WAUC in
    results.json are what the saved model scores on those rows in one process. STAR is the
    hard case: its normalisation statistics move with each process's shard (they are
    averaged before every evaluation); MMoE, PEPNet and MLoRA cover the other structures
    (shared experts with per-domain gates, embedding gates, per-domain adapters)."""
    from moe_mlora.metrics import DomainAUC
    from moe_mlora.serving.bundle import load_model

    overrides = tiny(
        cache_dir, f"method={method}", "trainer.accelerator=cpu", "trainer.max_epochs=3"
    )
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "moe_mlora.run", *overrides]
    command += ["trainer=ddp", f"trainer.devices={WORLD}", "threads=1", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LOCAL_RANK", None)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())

    datamodule, _ = build(compose(overrides))
    model = load_model(run_dir / "model.pt").model.eval()

    def wauc(loader) -> float:
        metric = DomainAUC(datamodule.num_domains)
        with torch.no_grad():
            for batch in loader:
                logits = model(batch["sparse"], batch["domain"])
                metric.update(torch.sigmoid(logits), batch["label"], batch["domain"])
        return float(metric.compute()["wauc"])

    assert wauc(datamodule.val_dataloader()) == pytest.approx(
        results["phases"][0]["best_val_wauc"], abs=1e-6
    )
    assert wauc(datamodule.test_dataloader()) == pytest.approx(results["test"]["wauc"], abs=1e-6)
