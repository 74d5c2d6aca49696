"""Training step time with each dropout mask: ``python -m moe_mlora.bench dropout``.

Builds each method's model as ``python -m moe_mlora.run`` does (DeepFM, one MovieLens-100K
split), takes the same training batches for all, and times forward + backward + Adam step
with ``dropout_mask=uniform`` (one float draw per element) and ``dropout_mask=bits`` (16-bit
draws, four per 64-bit integer), on two copies of each model built with the same seed, one
per mask. The rounds alternate which mask goes first, so the machine's drift hits both
alike. Prints the median step of the best round per method and mask, their ratio, the cost
of drawing one mask at the tower's widths, and the measured drop rate of each mask::

    python -m moe_mlora.bench dropout                               # 6 methods, gender
    python -m moe_mlora.bench dropout methods=base,mmoe rounds=10 split=age
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from moe_mlora.allocator import configure_allocator
from moe_mlora.bench.core import DEFAULT_ROOT, StepTimer, require_ml100k
from moe_mlora.cli import key_value_argv
from moe_mlora.models.layers import DROPOUT_MASKS, Dropout, set_dropout_mask

DEFAULT_METHODS = "base,mlora,moe_mlora,mmoe,ple,star"
#: Mask shapes timed on their own: DeepFM's first hidden layer, and MMoE's four experts.
MASK_SHAPES = ((1024, 256), (1024, 4, 256))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moe_mlora.bench dropout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="MovieLens-100K folder")
    parser.add_argument("--split", default="gender", help="MovieLens split (default gender)")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"({DEFAULT_METHODS})")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per mask (default 6)")
    parser.add_argument("--batches", type=int, default=30, help="batches per round (30)")
    return parser.parse_args(key_value_argv(parser, argv))


def build_timer(method: str, datamodule, args: argparse.Namespace, batches: list) -> StepTimer:
    """The method's model as a run builds it (seed 1), timed on ``batches``."""
    from moe_mlora.config import compose
    from moe_mlora.pipeline.build import build_module

    cfg = compose([f"data=movielens_{args.split}", f"data.root={args.root}", f"method={method}"])
    torch.manual_seed(1)
    model = build_module(cfg, datamodule).model
    return StepTimer(model, batches)


def build_timers(args: argparse.Namespace) -> dict[str, dict[str, StepTimer]]:
    """Per method, one timer per mask, each on its own copy of the model (same seed)."""
    from hydra.utils import instantiate

    from moe_mlora.config import compose
    from moe_mlora.pipeline.build import quiet_lightning

    quiet_lightning()
    cfg = compose([f"data=movielens_{args.split}", f"data.root={args.root}", "progress=false"])
    datamodule = instantiate(cfg.data, shuffle_seed=1, cache_dir=None, progress=False)
    datamodule.prepare()
    batches = list(datamodule.train_dataloader())[: args.batches]
    timers = {}
    for method in (m.strip() for m in args.methods.split(",") if m.strip()):
        timers[method] = {}
        for mask in DROPOUT_MASKS:
            timer = build_timer(method, datamodule, args, batches)
            set_dropout_mask(timer.model, mask)
            timers[method][mask] = timer
    return timers


def time_steps(timers: dict[str, dict[str, StepTimer]], rounds: int) -> dict[str, dict]:
    """Seconds per step (best round's median) of each method under each mask."""
    for round_ in range(rounds):
        order = DROPOUT_MASKS if round_ % 2 == 0 else DROPOUT_MASKS[::-1]
        for by_mask in timers.values():
            for mask in order:
                by_mask[mask].round()
    return {m: {mask: t.seconds for mask, t in by_mask.items()} for m, by_mask in timers.items()}


def time_mask_draws(rounds: int = 30) -> dict[tuple, dict[str, float]]:
    """Milliseconds to draw one mask (p = 0.5) of each of MASK_SHAPES, fastest of ``rounds``."""
    drawn = {}
    for shape in MASK_SHAPES:
        x = torch.ones(shape)
        drawn[shape] = {}
        for mask in DROPOUT_MASKS:
            drop = Dropout(0.5, mask=mask)
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                drop.keep(x)
                times.append(time.perf_counter() - start)
            drawn[shape][mask] = min(times) * 1e3
    return drawn


def drop_rates(p: float = 0.3, count: int = 10_000_000) -> dict[str, float]:
    """The share of ``count`` elements each mask drops at ``p``."""
    torch.manual_seed(0)
    ones = torch.ones(count)
    return {
        mask: (Dropout(p, mask=mask)(ones) == 0).double().mean().item() for mask in DROPOUT_MASKS
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv or [])
    require_ml100k(args.root, "dropout")
    configure_allocator("tuned")  # as a run does by default
    torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
        "allocator=tuned; "
        f"DeepFM on MovieLens {args.split}, batch 1024, {args.batches} batches a round, "
        f"{args.rounds} rounds per mask (alternating which goes first); ms per step = the "
        "best round's median"
    )
    steps = time_steps(build_timers(args), args.rounds)
    print("\n| method | uniform ms/step | bits ms/step | bits / uniform |")
    print("|---|---|---|---|")
    for method, seconds in steps.items():
        ratio = seconds["bits"] / seconds["uniform"]
        print(
            f"| {method} | {seconds['uniform'] * 1e3:.2f} | {seconds['bits'] * 1e3:.2f} | "
            f"{ratio:.2f} |"
        )
    print("\n| mask shape | uniform ms | bits ms | bits / uniform |")
    print("|---|---|---|---|")
    for shape, ms in time_mask_draws().items():
        label = "x".join(map(str, shape))
        ratio = ms["bits"] / ms["uniform"]
        print(f"| {label} | {ms['uniform']:.2f} | {ms['bits']:.2f} | {ratio:.2f} |")
    rates = drop_rates()
    print(
        "\ndropped at p = 0.3 over 10M elements: "
        + ", ".join(f"{mask} {rate:.5f}" for mask, rate in rates.items())
    )
    ratios = [s["bits"] / s["uniform"] for s in steps.values()]
    print(f"bits / uniform step time: median {statistics.median(ratios):.2f} over the methods")
