"""Wheels for a GPU machine that cannot reach a package registry.

``python -m moe_mlora.bench.gpu_wheels [DEST] [--python-version 3.12]`` (``make gpu-wheels``)
saves, into ``DEST`` (default ``build/gpu-wheels``), wheels of the packages a typical GPU
image lacks: hydra-core, omegaconf, antlr4-python3-runtime and polars (with its compiled
runtime). Each is pinned to the version installed here, so the GPU machine runs what the
tests ran. The image is expected to bring torch (its own CUDA build, used as it is),
Lightning, torchmetrics, numpy, matplotlib, PyYAML, packaging and tqdm.

Run it where pip reaches the registry; ``experiments/gpu/run_checks.sh`` then installs the
wheels on the GPU machine with ``pip install --no-index``. Binary wheels are fetched for
x86-64 Linux (manylinux) and the GPU machine's Python (``--python-version``); antlr4's
runtime is published as a source archive only, so it is built into a (pure-Python) wheel.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from moe_mlora.cli import key_value_argv

PACKAGES = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "polars", "polars-runtime-32")
SOURCE_ONLY = frozenset({"antlr4-python3-runtime"})
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
DEFAULT_DEST = Path("build/gpu-wheels")


def pins() -> list[str]:
    """``name==version`` of each package in :data:`PACKAGES` installed here.

    polars before its 1.3x releases had no separate runtime package; one not installed here
    is left out (the GPU machine then needs nothing of it).
    """
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return found


def commands(dest: Path, python_version: str) -> list[list[str]]:
    """The pip commands that put every pinned wheel into ``dest``."""
    pinned = pins()
    binary = [pin for pin in pinned if pin.split("==")[0] not in SOURCE_ONLY]
    platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    download = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    target = ["--python-version", python_version, "--implementation", "cp", *platforms]
    listed = [[*download, *target, "-d", str(dest), *binary]]
    for pin in pinned:
        if pin.split("==")[0] in SOURCE_ONLY:
            listed.append([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dest), pin])
    return listed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m moe_mlora.bench.gpu_wheels",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dest", type=Path, nargs="?", default=DEFAULT_DEST)
    parser.add_argument(
        "--python-version", default="3.12", help="the GPU machine's Python (default 3.12)"
    )
    args = parser.parse_args(key_value_argv(parser, argv))
    args.dest.mkdir(parents=True, exist_ok=True)
    for command in commands(args.dest, args.python_version):
        print("$", " ".join(command[1:]), flush=True)
        if subprocess.run(command).returncode != 0:
            raise SystemExit(
                "moe_mlora.bench.gpu_wheels: pip failed (above); it needs to reach the package "
                "registry from this machine"
            )
    wheels = sorted(path.name for path in args.dest.glob("*.whl"))
    print(f"{len(wheels)} wheels in {args.dest}:", *wheels, sep="\n  ")


if __name__ == "__main__":
    main()
