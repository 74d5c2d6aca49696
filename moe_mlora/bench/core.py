"""Core speed and accuracy benchmark: ``python -m moe_mlora.bench [core] [--root DIR]``.

Prints, for DeepFM on MovieLens (gender split, seed 123):
  1. the training-step time (forward + backward + Adam, batch 1024, the same
     batches) of base, MLoRA, and MoE-MLoRA (E experts) in each of its three
     phases, as the phases train (frozen parts get no gradients), plus the
     full mixture with every parameter trainable for reference; the
     configurations run interleaved and each keeps its best round's median;
  2. full runs of the three methods through the real pipeline (early stopping,
     best weights, test once): training samples/second per phase, wall time,
     test WAUC;
  3. the wall time of the default ``python -m moe_mlora.run`` as a user runs it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moe_mlora.cli import key_value_argv
from moe_mlora.config import compose
from moe_mlora.models import AdapterConfig, build_model
from moe_mlora.training.optim import make_adam

# Where the benchmarks look for MovieLens-100K unless given --root/root=.
DEFAULT_ROOT = Path(os.environ.get("MOE_MLORA_ML100K", "data/ml-100k"))
ROOT_HINT = "pass --root DIR or set MOE_MLORA_ML100K"


def require_ml100k(root: Path, benchmark: str) -> None:
    """Stop with one line saying where to point ``benchmark`` when ``root`` lacks ML-100K."""
    if not (root / "u.data").is_file():
        raise SystemExit(
            f"moe_mlora.bench {benchmark}: MovieLens-100K not found at {root}; {ROOT_HINT}"
        )


class StepTimer:
    """One model in one training configuration, timed step by step on fixed batches."""

    def __init__(self, model: torch.nn.Module, batches: list[dict]) -> None:
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.model = model
        self.batches = batches
        self.optimizer = make_adam(trainable, lr=1e-3, experts=model.expert_parameters())
        self.loss = torch.nn.BCEWithLogitsLoss()
        self.medians: list[float] = []

    def round(self) -> None:
        """One pass over the batches: forward + backward + Adam step each; keeps the median."""
        self.model.train()
        times = []
        for batch in self.batches:
            start = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            logits = self.model(batch["sparse"], batch["domain"], batch.get("expert"))
            self.loss(logits, batch["label"]).backward()
            self.optimizer.step()
            times.append(time.perf_counter() - start)
        self.medians.append(statistics.median(times))

    @property
    def seconds(self) -> float:
        """Best round's median: the machine's noise only ever adds time."""
        return min(self.medians[1:] or self.medians)


def step_configurations(data, experts: int, batches: list[dict]) -> dict[str, StepTimer]:
    """Base, MLoRA, and MoE-MLoRA's step in each phase (plus everything trainable)."""
    from moe_mlora.data.batches import expert_assignment
    from moe_mlora.training.phases import set_trainable

    def model(adapter: AdapterConfig, routing: str, trainable: tuple[bool, bool, bool]):
        torch.manual_seed(0)
        built = build_model("deepfm", data.fields, data.num_domains, adapter)
        built.routing = routing
        set_trainable(built, *trainable)
        return built

    moe = AdapterConfig("moe", experts=experts)
    assignment = expert_assignment(experts, data.num_domains)
    first_expert = {domains[0]: e for e, domains in reversed(list(enumerate(assignment)))}
    expert_of = torch.tensor([first_expert[d] for d in range(data.num_domains)])
    expert_batches = [{**b, "expert": expert_of[b["domain"]]} for b in batches]
    everything = (True, True, True)
    return {
        "base": StepTimer(model(AdapterConfig("none"), "off", everything), batches),
        "mlora": StepTimer(model(AdapterConfig("mlora"), "domain", everything), batches),
        "moe phase 1 (backbone)": StepTimer(model(moe, "off", (True, False, False)), batches),
        "moe phase 2 (experts)": StepTimer(
            model(moe, "expert", (False, True, False)), expert_batches
        ),
        "moe phase 3 (gate)": StepTimer(model(moe, "mixture", (False, False, True)), batches),
        "moe all trainable": StepTimer(model(moe, "mixture", everything), batches),
    }


def bench_steps(datamodule, experts: int, rounds: int = 6) -> dict[str, float]:
    """Median step time of each configuration; rounds interleave them so noise hits all alike."""
    batches = list(datamodule.train_dataloader())[:30]
    timers = step_configurations(datamodule.processed, experts, batches)
    for _ in range(rounds):
        for timer in timers.values():
            timer.round()
    return {name: timer.seconds for name, timer in timers.items()}


def bench_runs(root: Path, threads: int, experts: int, output: Path) -> list[dict]:
    from moe_mlora.pipeline.runner import train_and_evaluate

    results = []
    for method in ("base", "mlora", "moe_mlora"):
        overrides = [
            "data=movielens_gender",
            f"data.root={root}",
            "model=deepfm",
            f"method={method}",
            f"threads={threads}",
            "seed=123",
            "logger.wandb.enabled=false",
            "progress=false",
        ]
        if method == "moe_mlora":  # the paper's phases: the figures in core_benchmark.md
            overrides += [f"experts={experts}", "method/schedule=paper"]
        cfg = compose(overrides)
        results.append(train_and_evaluate(cfg, output / method))
    return results


def time_default_run(threads: int) -> float:
    start = time.perf_counter()
    command = [sys.executable, "-m", "moe_mlora.run", f"threads={threads}", "progress=false"]
    with tempfile.TemporaryDirectory() as folder:
        command.append(f"hydra.run.dir={folder}")
        subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m moe_mlora.bench core",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument(
        "--root", type=Path, default=DEFAULT_ROOT, help="MovieLens folder (ML-100K or ML-1M)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--experts", type=int, default=8, help="MoE-MLoRA expert count (default 8)")
    parser.add_argument(
        "--skip-default-run", action="store_true", help="do not time the default run"
    )
    parser.add_argument("--steps-only", action="store_true", help="only part 1 (step times)")
    args = parser.parse_args(key_value_argv(parser, argv))
    if not args.root.exists():
        parser.error(f"MovieLens folder {args.root} not found; {ROOT_HINT}")
    torch.set_num_threads(args.threads)

    from moe_mlora.pipeline.build import quiet_lightning

    quiet_lightning()
    with tempfile.TemporaryDirectory() as folder:
        results = (
            []
            if args.steps_only
            else bench_runs(args.root, args.threads, args.experts, Path(folder))
        )
        cfg = compose(["data=movielens_gender", f"data.root={args.root}", "progress=false"])
        from hydra.utils import instantiate

        datamodule = instantiate(cfg.data, shuffle_seed=123, cache_dir=None, progress=False)
        steps = bench_steps(datamodule, args.experts)
    skip_default = args.skip_default_run or args.steps_only
    default_wall = None if skip_default else time_default_run(args.threads)

    print(f"\n== moe_mlora benchmark: DeepFM, {args.root.name} gender, {args.threads} threads ==")
    print(f"\n1. training step, batch 1024 (forward + backward + Adam), E={args.experts}")
    base_step = steps["base"]
    for name, seconds in steps.items():
        print(
            f"   {name:<24}{seconds * 1e3:8.2f} ms   {1024 / seconds:10,.0f} samples/s   "
            f"{seconds / base_step:5.2f}x base"
        )
    if results:
        print_runs(results)
    if default_wall is not None:
        print(
            f"\n3. default `python -m moe_mlora.run` (process start to exit): {default_wall:.1f}s"
        )


def print_runs(results: list[dict]) -> None:
    print("\n2. full runs (early stopping, best weights, test once; seed 123)")
    print(f"   {'method':<11}{'phase':<10}{'epochs':>7}{'samples/s':>12}{'phase time':>12}")
    for result in results:
        for phase in result["phases"]:
            print(
                f"   {result['run']['method']:<11}{phase['kind']:<10}{phase['epochs']:>7}"
                f"{phase['train_samples_per_s']:>12,.0f}{phase['wall_time_s']:>11.1f}s"
            )
    print(f"\n   {'method':<11}{'test WAUC':>10}{'test AUC':>10}{'wall time':>11}")
    for result in results:
        test = result["test"]
        print(
            f"   {result['run']['method']:<11}{test['wauc']:>10.4f}{test['auc']:>10.4f}"
            f"{result['wall_time_s']:>10.1f}s"
        )


if __name__ == "__main__":
    main()
