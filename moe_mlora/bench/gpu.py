"""Training throughput on one accelerator: ``python -m moe_mlora.bench gpu [options]``.

DeepFM base and MoE-MLoRA (E = 8) at batch sizes 1024 and 8192 on generated Taobao-20 data
(``data.generate_if_missing``: made once under the cache folder), each trained for
``--max-epochs`` epochs per phase with ``trainer=gpu``. Prints training samples/second and
wall time per phase and the run's test WAUC (from each run's results.json, so fp32 and
``--precision bf16-mixed`` compare on both) and writes the table to ``--out`` if given::

    python -m moe_mlora.bench gpu                                # on a CUDA GPU
    python -m moe_mlora.bench gpu --precision bf16-mixed         # mixed precision
    python -m moe_mlora.bench gpu --accelerator cpu --clicks 20000 --max-epochs 1   # smoke run

The same command on a CPU-only machine stops with a message (pass --accelerator cpu).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from moe_mlora.cli import key_value_argv

CONFIGS = [("base", None), ("moe_mlora", 8)]
BATCH_SIZES = (1024, 8192)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m moe_mlora.bench gpu")
    parser.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"])
    parser.add_argument("--precision", default="32-true", help="e.g. 32-true, bf16-mixed")
    parser.add_argument("--clicks", type=int, default=1_000_000, help="generated log size")
    parser.add_argument("--max-epochs", type=int, default=3, help="per phase")
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=list(BATCH_SIZES),
        help=f"batch sizes to run (default {' '.join(map(str, BATCH_SIZES))})",
    )
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    return parser.parse_args(key_value_argv(parser, argv))


def overrides(args: argparse.Namespace, method: str, experts: int | None, batch: int, cache: Path):
    trainer = "gpu" if args.accelerator == "gpu" else "default"
    chosen = [
        "data=taobao20",
        "data.generate_if_missing=true",
        f"data.generator.clicks={args.clicks}",
        f"data.batch_size={batch}",
        "model=deepfm",
        f"method={method}",
        *(["method/schedule=paper"] if method == "moe_mlora" else []),  # the measured phases
        f"trainer={trainer}",
        f"trainer.accelerator={args.accelerator}",
        f"trainer.precision={args.precision}",
        f"trainer.max_epochs={args.max_epochs}",
        "logger.wandb.enabled=false",
        "checkpoint=false",
        "progress=false",
        f"paths.cache_dir={cache}",
    ]
    return [*chosen, f"experts={experts}"] if experts else chosen


def device_name(accelerator: str) -> str:
    if accelerator == "gpu":
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"


def main(argv: list[str]) -> None:
    from moe_mlora.config import compose
    from moe_mlora.data.cache import default_cache_dir
    from moe_mlora.pipeline.runner import train_and_evaluate

    args = parse_args(argv)
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run on a GPU machine or pass --accelerator cpu")
    cache = default_cache_dir()
    epochs = f"{args.max_epochs} epoch{'s' if args.max_epochs != 1 else ''}"
    lines = [
        f"DeepFM on generated Taobao-20 ({args.clicks:,} clicks), {device_name(args.accelerator)},"
        f" precision {args.precision}, {epochs} per phase",
        "",
        "| method | batch | phase | training samples/s | phase wall s | test WAUC |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        for method, experts in CONFIGS:
            for batch in args.batch_sizes:
                run_dir = Path(scratch) / f"{method}-{batch}"
                cfg = compose(overrides(args, method, experts, batch, cache))
                train_and_evaluate(cfg, run_dir)
                results = json.loads((run_dir / "results.json").read_text())
                name = f"{method} E={experts}" if experts else method
                wauc = results["test"]["wauc"]
                for phase in results["phases"]:
                    lines.append(
                        f"| {name} | {batch} | {phase['index']} {phase['kind']} "
                        f"| {phase['train_samples_per_s']:,.0f} | {phase['wall_time_s']:.1f} "
                        f"| {wauc:.4f} |"
                    )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
