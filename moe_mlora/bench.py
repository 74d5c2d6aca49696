"""Speed and accuracy benchmark: ``python -m moe_mlora.bench [--root DIR] [--threads 2]``.

Prints, for DeepFM on MovieLens (gender split, seed 123):
  1. the training-step time of base, MLoRA and MoE-MLoRA (E experts, full
     mixture, every parameter trainable) in one process, back to back, on the
     same batches: forward + backward + Adam step at batch 1024;
  2. full runs of the three methods through the real pipeline (early stopping,
     best weights, test once): training samples/second per phase, wall time,
     test WAUC;
  3. the wall time of the default ``python -m moe_mlora.run`` as a user runs it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moe_mlora.config import compose
from moe_mlora.models import AdapterConfig, build_model

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


def step_time(model: torch.nn.Module, batches: list[dict], repeats: int) -> float:
    """Median seconds of one training step (forward, backward, Adam) over the batches."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    times = []
    for _ in range(repeats):
        for batch in batches:
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(batch["sparse"], batch["domain"]), batch["label"])
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
    return statistics.median(times[len(batches) :])  # first pass is warm-up


def bench_steps(datamodule, experts: int, repeats: int = 3) -> dict[str, float]:
    data = datamodule.processed
    batches = list(datamodule.train_dataloader())[:40]
    adapters = {
        "base": AdapterConfig("none"),
        "mlora": AdapterConfig("mlora"),
        f"moe_mlora (E={experts})": AdapterConfig("moe", experts=experts),
    }
    timings = {}
    for name, adapter in adapters.items():
        torch.manual_seed(0)
        model = build_model("deepfm", data.fields, data.num_domains, adapter)
        timings[name] = step_time(model, batches, repeats)
    return timings


def bench_runs(root: Path, threads: int, experts: int, output: Path) -> list[dict]:
    from moe_mlora.run import train_and_evaluate

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
        if method == "moe_mlora":
            overrides.append(f"experts={experts}")
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
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--root", type=Path, default=DEFAULT_ROOT, help="MovieLens folder (ML-100K or ML-1M)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--experts", type=int, default=8, help="MoE-MLoRA expert count (default 8)")
    parser.add_argument(
        "--skip-default-run", action="store_true", help="do not time the default run"
    )
    args = parser.parse_args(argv)
    if not args.root.exists():
        parser.error(f"MovieLens folder {args.root} not found; pass --root DIR")
    torch.set_num_threads(args.threads)

    from moe_mlora.run import quiet_lightning

    quiet_lightning()
    with tempfile.TemporaryDirectory() as folder:
        results = bench_runs(args.root, args.threads, args.experts, Path(folder))
        cfg = compose(["data=movielens_gender", f"data.root={args.root}", "progress=false"])
        from hydra.utils import instantiate

        datamodule = instantiate(cfg.data, shuffle_seed=123, cache_dir=None, progress=False)
        steps = bench_steps(datamodule, args.experts)
    default_wall = None if args.skip_default_run else time_default_run(args.threads)

    print(
        f"\n== moe_mlora benchmark: DeepFM, {args.root.name} gender, {args.threads} threads =="
    )
    print("\n1. training step (batch 1024, forward + backward + Adam), same batches")
    base_step = steps["base"]
    for name, seconds in steps.items():
        print(
            f"   {name:<22}{seconds * 1e3:8.2f} ms   {1024 / seconds:10,.0f} samples/s   "
            f"{seconds / base_step:5.2f}x base"
        )
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
    if default_wall is not None:
        print(
            f"\n3. default `python -m moe_mlora.run` (process start to exit): {default_wall:.1f}s"
        )


if __name__ == "__main__":
    main()
