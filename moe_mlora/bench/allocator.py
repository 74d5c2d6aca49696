"""Training steps under glibc's own malloc settings and ``allocator=tuned``:
``python -m moe_mlora.bench allocator``.

Runs the same training (``python -m moe_mlora.run``'s pipeline, one method on one MovieLens
split) in pairs of fresh processes, one per allocator mode, alternating which goes first, so
machine drift hits both alike (``allocator=tuned`` cannot be undone inside a process). In
each run a callback measures every training batch, from Lightning's batch-start hook to its
batch-end hook (forward, backward, optimizer step): the page faults the process took (minor
faults, from ``getrusage``) and the milliseconds. Prints one row per run and, per pair, the
tuned run's median step time over the default run's::

    python -m moe_mlora.bench allocator                    # MMoE, occupation, 6 pairs
    python -m moe_mlora.bench allocator method=ple split=age pairs=3

A step that frees and reallocates big temporaries faults them in again every step under
glibc's settings; that is what ``allocator=tuned`` (a run's default) avoids.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

from moe_mlora.allocator import MODES
from moe_mlora.bench.core import DEFAULT_ROOT, require_ml100k
from moe_mlora.cli import key_value_argv


class StepCosts(L.Callback):
    """Page faults and milliseconds of every training batch (batch start to batch end)."""

    def __init__(self) -> None:
        self.faults: list[int] = []
        self.milliseconds: list[float] = []
        self._start: tuple[int, float] = (0, 0.0)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._start = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        faults, started = self._start
        self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
        self.milliseconds.append((time.perf_counter() - started) * 1e3)


#: The callback of the run in this process (the worker reads it after the run).
RECORDER = StepCosts()


def recorder() -> StepCosts:
    """The ``_target_`` of the worker's extra callback: this process's :data:`RECORDER`."""
    return RECORDER


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moe_mlora.bench allocator",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="MovieLens-100K folder")
    parser.add_argument("--method", default="mmoe", help="method (default mmoe)")
    parser.add_argument("--split", default="occupation", help="MovieLens split (occupation)")
    parser.add_argument("--pairs", type=int, default=6, help="pairs of runs (default 6)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--max-epochs", type=int, default=3, help="epochs per run (default 3)")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    return parser.parse_args(key_value_argv(parser, argv))


def worker(args: argparse.Namespace) -> None:
    """One run under ``args.worker``; prints its per-batch costs as JSON."""
    from moe_mlora.config import compose
    from moe_mlora.pipeline.build import quiet_lightning
    from moe_mlora.pipeline.runner import train_and_evaluate

    quiet_lightning()
    overrides = [
        f"data=movielens_{args.split}",
        f"data.root={args.root}",
        f"method={args.method}",
        "seed=1",
        f"threads={args.threads}",
        f"trainer.max_epochs={args.max_epochs}",
        f"allocator={args.worker}",
        "logger.wandb.enabled=false",
        "progress=false",
        "checkpoint=false",
        "+callbacks.extra.step_costs._target_=moe_mlora.bench.allocator.recorder",
    ]
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
        train_and_evaluate(compose(overrides), Path(folder))
    print(json.dumps({"faults": RECORDER.faults, "milliseconds": RECORDER.milliseconds}))


def run_worker(argv: list[str], mode: str) -> dict[str, list]:
    command = [sys.executable, "-m", "moe_mlora.bench", "allocator", *argv, "--worker", mode]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"moe_mlora.bench allocator: the {mode} run failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    require_ml100k(args.root, "allocator")
    print(
        f"{args.method} on MovieLens {args.split}, {args.threads} threads, {args.max_epochs} "
        f"epochs a run, {args.pairs} pairs; per training batch (batch-start to batch-end hook)"
    )
    print("| pair | allocator | batches | page faults (mean) | ms (median) |")
    print("|---|---|---|---|---|")
    ratios = []
    for pair in range(1, args.pairs + 1):
        order = MODES if pair % 2 else MODES[::-1]  # alternate which mode runs first
        medians = {}
        for mode in order:
            costs = run_worker(argv, mode)
            medians[mode] = statistics.median(costs["milliseconds"])
            faults = statistics.mean(costs["faults"])
            print(
                f"| {pair} | {mode} | {len(costs['faults'])} | {faults:,.0f} | "
                f"{medians[mode]:.1f} |",
                flush=True,
            )
        ratios.append(medians["tuned"] / medians["default"])
    faster = sum(ratio < 1 for ratio in ratios)
    print(
        f"tuned / default step time, per pair: {', '.join(f'{r:.2f}' for r in ratios)}; "
        f"median {statistics.median(ratios):.2f}; tuned faster in {faster} of {len(ratios)}"
    )
