"""``python -m moe_mlora.bench [core|...] [options]``: run one benchmark (default: core)."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "core": "speed and WAUC of base / MLoRA / MoE-MLoRA on MovieLens (moe_mlora.bench.core)",
    "taobao": "Taobao preprocessing at 10M clicks (prep), WAUC grid (moe_mlora.bench.taobao)",
    "parity": "accuracy and speed of every backbone vs DeepCTR-Torch (moe_mlora.bench.parity)",
    "baselines": "training speed of every method (DeepFM) vs DeepCTR-Torch's DeepFM, MovieLens",
    "predict": "rows/second of python -m moe_mlora.predict on 1M generated rows",
    "gpu": "training samples/s, DeepFM base and MoE-MLoRA E=8, batch 1024/8192, Taobao-20",
    "gpu_checks": "bf16: the CIN backward, every method, training; DDP on one device (pass/fail)",
    "scaling": "step time vs base as domains and experts grow (MLoRA, phases 2 and 3)",
    "contention": "the default run idle and beside N busy processes, per thread setting",
    "cin": "xDeepFM step time: our CIN vs a Conv1d CIN, glibc's vs the tuned allocator",
    "allocator": "page faults and ms per training batch, glibc's malloc vs allocator=tuned",
    "dropout": "training step time of each method with dropout_mask=uniform and =bits",
}


def main(argv: list[str]) -> None:
    name = "core"
    if argv and not argv[0].startswith("-"):
        name, argv = argv[0], argv[1:]
    if name not in BENCHMARKS:
        listing = "\n".join(f"  {key:<12}{text}" for key, text in BENCHMARKS.items())
        raise SystemExit(f"unknown benchmark {name!r}; choose one of:\n{listing}")
    importlib.import_module(f"moe_mlora.bench.{name}").main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
