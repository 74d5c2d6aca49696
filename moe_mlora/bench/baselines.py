"""Training speed of every method against DeepCTR-Torch's base DeepFM on MovieLens.

``python -m moe_mlora.bench baselines [root=DIR] [methods=...] [splits=...] [seeds=1]``

The multi-domain baselines (Shared-Bottom, MMoE, PLE, STAR, PEPNet) replace DeepFM's DNN tower,
and base, MLoRA and MoE-MLoRA keep it, so one bar applies to all of them: their training
throughput against DeepCTR-Torch's plain DeepFM, trained on the same rows with the same
protocol. The bar is 1.0x (every method at least as fast as the reference library's base
model). Per seed, DeepCTR's DeepFM runs first and last, and every method on every split in
between, one after the other in this process; each run's ratio is to its own seed's DeepCTR
runs, so that the machine's drift between seeds cancels. Training samples/s is counted
as in ``bench parity`` (training wall clock, validation excluded; MoE-MLoRA: all of its
phases). The epoch cap (default 3) keeps the benchmark short: throughput, not accuracy, is
measured here (accuracy: ``experiments/baselines.md``).

Whole-run throughput can move 10-35% between runs minutes apart on a shared or virtual
machine, so every run also records the median time from one optimizer step to the next
(every optimizer's steps, through torch's global step hook: the same clock for both
libraries).
That interval is a training batch with its data fetch and the loop's overhead; epoch and
phase boundaries (validation) are single outliers the median ignores. Its paired ratio
(DeepCTR's median batch time over ours, per seed) is printed as a second table.

``allocator=tuned`` (the default, as in a run) or ``default`` sets glibc's malloc for the
whole process before the first run, so both libraries train under it. DeepCTR-Torch's
DeepFM page-faults about 10 times a step under either, so the bar does not depend on it;
MMoE and PLE with full-width experts do (see ``moe_mlora/allocator.py``).

Needs the optional extra ``make install-bench`` (deepctr-torch with the venv's torch).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from statistics import median

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from moe_mlora.allocator import MODES, configure_allocator
from moe_mlora.bench.core import DEFAULT_ROOT, ROOT_HINT
from moe_mlora.bench.parity import (
    REPO,
    markdown_table,
    require_deepctr,
    run_deepctr,
    text_table,
)
from moe_mlora.cli import key_value_argv

METHODS = (
    "base", "mlora", "moe_mlora", "shared_bottom", "mmoe", "ple", "star", "pepnet",
    "mmoe_small", "ple_small",
)  # fmt: skip
SPLITS = ("gender", "age", "occupation")
SPEED_TARGET = 1.0  # every method's training samples/s >= this x DeepCTR-Torch's DeepFM
DEFAULT_OUTPUT = REPO / "experiments" / "baselines_speed.md"


@dataclass
class Speed:
    """One run's training throughput, and its median time per training batch."""

    method: str  # "deepctr" for DeepCTR-Torch's DeepFM
    split: str
    seed: int
    samples: int
    seconds: float
    batch_seconds: float = float("nan")

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else float("nan")


@contextlib.contextmanager
def step_times() -> Iterator[list[float]]:
    """The ``perf_counter`` time of every optimizer step taken inside the block."""
    times: list[float] = []
    handle = register_optimizer_step_post_hook(lambda *_: times.append(time.perf_counter()))
    try:
        yield times
    finally:
        handle.remove()


def median_interval(times: list[float]) -> float:
    """The median time between consecutive steps (NaN with fewer than two)."""
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    return median(gaps) if gaps else float("nan")


def run_method(method: str, split: str, args: argparse.Namespace, seed: int, out: Path) -> Speed:
    """One of our runs (DeepFM, ``method``, MovieLens ``split``) and its training throughput."""
    from moe_mlora.config import compose
    from moe_mlora.pipeline.runner import train_and_evaluate

    overrides = [
        f"data=movielens_{split}",
        f"data.root={args.root}",
        "model=deepfm",
        f"method={method}",
        f"seed={seed}",
        f"threads={args.threads}",
        f"trainer.max_epochs={args.max_epochs}",
        f"allocator={args.allocator}",
        "logger.wandb.enabled=false",
        "progress=false",
        "checkpoint=false",
    ]
    with contextlib.redirect_stdout(io.StringIO()), step_times() as times:
        results = train_and_evaluate(compose(overrides), out)
    phases = results["phases"]
    samples = sum(p["train_samples"] for p in phases)
    seconds = sum(p["train_wall_seconds"] for p in phases)
    return Speed(method, split, seed, samples, seconds, median_interval(times))


def run_reference(data, seed: int, max_epochs: int) -> Speed:
    """DeepCTR-Torch's DeepFM (the bar), as ``bench parity`` trains it."""
    with step_times() as times:
        record = run_deepctr("deepfm", data, seed, max_epochs)
    return Speed(
        "deepctr", "gender", seed, record.train_samples, record.train_seconds,
        median_interval(times),
    )  # fmt: skip


def seed_bars(speeds: list[Speed]) -> dict[int, float]:
    """Each seed's bar: the mean samples/s of its DeepCTR-Torch runs (before and after)."""
    rates: dict[int, list[float]] = {}
    for s in speeds:
        if s.method == "deepctr":
            rates.setdefault(s.seed, []).append(s.samples_per_s)
    return {seed: sum(r) / len(r) for seed, r in rates.items()}


def batch_rows(speeds: list[Speed], methods: list[str], splits: list[str]) -> list[list[str]]:
    """Per method and split: median ms per training batch, and the median over seeds of the
    seed's DeepCTR batch time (mean of its runs) over the run's: above 1.0x is faster."""
    bars: dict[int, list[float]] = {}
    for s in speeds:
        if s.method == "deepctr":
            bars.setdefault(s.seed, []).append(s.batch_seconds)
    rows = []
    for method in methods:
        cells = [method]
        for split in splits:
            runs = [s for s in speeds if (s.method, s.split) == (method, split)]
            ms = median(s.batch_seconds for s in runs) * 1e3
            ratio = median(sum(bars[s.seed]) / len(bars[s.seed]) / s.batch_seconds for s in runs)
            cells.append(f"{ms:.2f} ({ratio:.2f}x)")
        rows.append(cells)
    return rows


def summary_rows(speeds: list[Speed], methods: list[str], splits: list[str]) -> list[list[str]]:
    """Per method and split: median samples/s, and the median over seeds of its ratio to the
    same seed's bar (paired, so that the machine's drift between seeds cancels); PASS/FAIL."""
    bars = seed_bars(speeds)
    rows = []
    for method in methods:
        cells, passed = [method], True
        for split in splits:
            runs = [s for s in speeds if (s.method, s.split) == (method, split)]
            rate = median(s.samples_per_s for s in runs)
            ratio = median(s.samples_per_s / bars[s.seed] for s in runs)
            passed &= ratio >= SPEED_TARGET
            cells.append(f"{rate:,.0f} ({ratio:.2f}x)")
        rows.append([*cells, "PASS" if passed else "FAIL"])
    return rows


def render_markdown(
    command: str,
    args: argparse.Namespace,
    speeds: list[Speed],
    rows: list[list[str]],
    batches: list[list[str]],
) -> str:
    references = [s.samples_per_s for s in speeds if s.method == "deepctr"]
    bar, low, high = median(references), min(references), max(references)
    reference_ms = median(s.batch_seconds for s in speeds if s.method == "deepctr") * 1e3
    header = ["method", *(f"{split} samples/s (x DeepCTR)" for split in args.splits), "≥ 1.0x"]
    batch_header = ["method", *(f"{split} ms per batch (x DeepCTR)" for split in args.splits)]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""# Training speed of every method against DeepCTR-Torch's DeepFM

Written on {when} by

```
{command}
```

- machine: {platform.machine()}, torch {torch.__version__}, {args.threads} threads;
- allocator: `{args.allocator}` for both libraries (set once, before the first run);
- seeds {", ".join(map(str, args.seeds))}, at most {args.max_epochs} epochs per run (and per phase);
- MovieLens at `{args.root.name}`, DeepFM with every method's defaults;
- figures: medians over seeds of training samples per second (training wall clock,
  validation excluded; MoE-MLoRA counts all of its phases), runs interleaved per seed;
- the bar: DeepCTR-Torch 0.3.0's plain DeepFM on the gender split, run before and after
  each seed's methods: median **{bar:,.0f} samples/s** over {len(references)} runs (range
  {low:,.0f} to {high:,.0f});
- the ratio (x DeepCTR) is paired: each run's samples/s over the mean of its own seed's two
  DeepCTR runs, median over seeds, so that the machine's drift between seeds cancels.

{markdown_table(header, rows)}

A method passes when it is at or above {SPEED_TARGET:.1f}x the bar on every split.

## Per training batch

The median time from one optimizer step to the next in each run (a batch, its data fetch
and the training loop's overhead; validation falls between epochs and is one outlier per
epoch), median over seeds. DeepCTR-Torch's DeepFM: **{reference_ms:.2f} ms** (median over its
runs). The ratio is paired like the one above: each seed's DeepCTR batch time (mean of
its runs) over the run's, so above 1.0x is faster than DeepCTR-Torch.

{markdown_table(batch_header, batches)}
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moe_mlora.bench baselines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="MovieLens folder")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1], help="default 1")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--max-epochs", type=int, default=3, help="epoch cap (default 3)")
    parser.add_argument(
        "--allocator",
        choices=MODES,
        default="tuned",
        help="glibc malloc settings for both libraries (default tuned, as a run's default)",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown written")
    return parser.parse_args(key_value_argv(parser, argv))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    require_deepctr()
    if not args.root.exists():
        raise SystemExit(
            f"moe_mlora.bench baselines: MovieLens folder {args.root} not found; {ROOT_HINT}"
        )
    from moe_mlora.data.movielens import prepare_movielens
    from moe_mlora.pipeline.build import quiet_lightning

    quiet_lightning()
    configure_allocator(args.allocator)  # before any run: both libraries train under it
    command = shlex.join(["python", "-m", "moe_mlora.bench", "baselines", *argv])
    data = prepare_movielens(args.root, "gender")
    speeds: list[Speed] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            torch.set_num_threads(args.threads)
            speeds.append(run_reference(data, seed, args.max_epochs))
            for split in args.splits:
                for method in args.methods:
                    folder = Path(scratch) / f"{method}-{split}-s{seed}"
                    speeds.append(run_method(method, split, args, seed, folder))
                    torch.set_num_threads(args.threads)
            speeds.append(run_reference(data, seed, args.max_epochs))  # brackets the seed
            done = [s for s in speeds if s.seed == seed]
            for s in done:
                print(
                    f"  seed {seed} {s.method:<14} {s.split:<10} {s.samples_per_s:>9,.0f} "
                    f"samples/s {s.batch_seconds * 1e3:6.2f} ms/batch "
                    f"[{(time.perf_counter() - start) / 60:.1f} min]",
                    flush=True,
                )
    rows = summary_rows(speeds, args.methods, args.splits)
    batches = batch_rows(speeds, args.methods, args.splits)
    header = ["method", *args.splits, "≥ 1.0x"]
    print(f"\nagainst DeepCTR-Torch's DeepFM ({args.threads} threads):")
    print(text_table(header, rows))
    print("\nms per training batch (x DeepCTR-Torch's):")
    print(text_table(["method", *args.splits], batches))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render_markdown(command, args, speeds, rows, batches))
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
