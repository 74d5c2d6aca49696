"""The default run on a busy machine: ``python -m moe_mlora.bench contention``.

Times ``python -m moe_mlora.run`` (the default experiment, as a user runs it: process start
to exit, W&B offline) idle, then beside ``--busy`` processes that keep the CPUs busy, and
prints both times and their ratio for each thread setting:

* ``default``: the project's defaults, whatever they are;
* ``threads=2`` / ``threads=1``: a fixed thread count (``threads=2`` is torch's default on a
  2-core machine, the setting the project had before it chose its threads itself);
* ``threads=2 passive``: 2 threads with ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP workers
  sleep at once instead of spinning first).

``--load python`` busy processes are pure-Python loops (one core each). ``--load torch``
ones are torch processes running small matrix products on 2 threads each, like parallel
sweep jobs or test runners: their OpenMP workers spin too. Extra arguments after ``--`` go
to every run (``-- method=base trainer.max_epochs=3``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from moe_mlora.cli import key_value_argv

PYTHON_LOAD = "while True: pass"
TORCH_LOAD = (
    "import torch\n"
    "torch.set_num_threads(2)\n"
    "a = torch.randn(256, 256)\n"
    "while True:\n"
    "    for _ in range(100):\n"
    "        b = a @ a\n"
)
VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "default": ([], {}),
    "threads=2": (["threads=2"], {}),
    "threads=1": (["threads=1"], {}),
    "threads=2 passive": (["threads=2"], {"OMP_WAIT_POLICY": "PASSIVE"}),
    "threads=2 spin=30000": (["threads=2"], {"GOMP_SPINCOUNT": "30000"}),
    "threads=2 spin=3000": (["threads=2"], {"GOMP_SPINCOUNT": "3000"}),
}


def start_load(count: int, kind: str) -> list[subprocess.Popen]:
    code = PYTHON_LOAD if kind == "python" else TORCH_LOAD
    return [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL)
        for _ in range(count)
    ]


def time_run(overrides: list[str], env: dict[str, str]) -> float:
    """Seconds from process start to exit of one ``python -m moe_mlora.run``."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "moe_mlora.run", "progress=false"]
        command += [f"hydra.run.dir={folder}", *overrides]
        start = time.perf_counter()
        done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return seconds


def measure(variant: str, busy: int, load: str, extra: list[str]) -> tuple[float, float]:
    overrides, env = VARIANTS[variant]
    idle = time_run(overrides + extra, env)
    processes = start_load(busy, load)
    try:
        time.sleep(1.0)  # let the load start
        loaded = time_run(overrides + extra, env)
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            process.wait()
    return idle, loaded


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog="python -m moe_mlora.bench contention",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--busy", type=int, default=4, help="busy processes (default 4)")
    parser.add_argument(
        "--load",
        choices=("python", "torch"),
        default="torch",
        help="what the busy processes run (default torch)",
    )
    parser.add_argument(
        "--variants",
        default="default,threads=2,threads=1",
        help=f"comma-separated, from: {', '.join(VARIANTS)}",
    )
    args = parser.parse_args(key_value_argv(parser, argv))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"contention: {cores} CPUs, {args.busy} busy {args.load} processes, runs: "
        f"python -m moe_mlora.run {' '.join(extra)}".rstrip()
    )
    print(f"  {'variant':<20}{'idle':>9}{'busy':>9}{'busy/idle':>11}")
    for variant in variants:
        idle, loaded = measure(variant, args.busy, args.load, extra)
        print(f"  {variant:<20}{idle:>8.1f}s{loaded:>8.1f}s{loaded / idle:>10.1f}x", flush=True)


if __name__ == "__main__":
    main()
