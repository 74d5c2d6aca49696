"""Step cost as domains and experts grow: ``python -m moe_mlora.bench scaling``.

Times one training step (forward + backward + Adam, batch 1024, DeepFM with MovieLens-100K's
field sizes, tower 256-128-64, 2 threads by default) relative to the base model's step:

* MLoRA at D = 2, 7, 21, 30, 64 domains;
* MoE-MLoRA's phase 2 (each row routed to one expert; only the experts train) and phase 3
  (the gate trains through the mixture: the dense softmax and the top-2 gate) at
  E = 2, 8, 32, 64, 128 experts.

Each configuration runs with the rows path (each row meets only its own experts) and the
dense path (every expert for every row, then weighted; how every step ran before the rows
path), where the routing allows both. The dense softmax mixture has only the dense path.
The batches are generated (no data needed): random field values, domains drawn uniformly
or with Zipf's law (``--domains zipf``: domain d has weight 1/(d+1), as uneven as real
themes). All configurations run interleaved, round after round, and each keeps its best
round's median step: noise on a shared machine only ever adds time. ``--allocator tuned``
(the default, as a run's) sets glibc's malloc as a training run does before the first step;
``--allocator default`` leaves glibc's own settings (see ``moe_mlora/allocator.py``).

Writes ``scaling.md`` (the table and how it was measured) and ``scaling.png`` (the curves)
into ``--out`` (default ``experiments``).
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_mlora.allocator import MODES, configure_allocator
from moe_mlora.bench.core import StepTimer
from moe_mlora.cli import key_value_argv
from moe_mlora.data.processed import FieldSpec
from moe_mlora.models import AdapterConfig, build_model
from moe_mlora.training.phases import set_trainable

# MovieLens-100K's fields and vocabulary sizes (index 0 is out-of-vocabulary)
FIELDS = [
    FieldSpec("user_id", 944),
    FieldSpec("movie_id", 1683),
    FieldSpec("age", 8),
    FieldSpec("gender", 3),
    FieldSpec("occupation", 22),
    FieldSpec("zip", 796),
    FieldSpec("genre", 19),
]
DOMAIN_COUNTS = (2, 7, 21, 30, 64)
EXPERT_COUNTS = (2, 8, 32, 64, 128)
BATCH = 1024


@dataclass
class Case:
    """One configuration: a series (the curve it belongs to), its D or E, its product path."""

    series: str
    count: int
    products: str
    timer: StepTimer | None = None


def make_batches(domains: int, experts: int, count: int, skew: str, seed: int = 0) -> list[dict]:
    """``count`` batches of generated rows; ``expert`` is each row's phase-2 expert."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.ones(domains)
    if skew == "zipf":
        weights = 1.0 / torch.arange(1, domains + 1, dtype=torch.float)
    batches = []
    for _ in range(count):
        sparse = torch.stack(
            [torch.randint(0, f.vocab_size, (BATCH,), generator=generator) for f in FIELDS], 1
        )
        domain = torch.multinomial(weights, BATCH, replacement=True, generator=generator)
        label = torch.randint(0, 2, (BATCH,), generator=generator).float()
        batches.append({"sparse": sparse, "domain": domain, "label": label, "expert": domain})
    return batches


def build(case: Case, domains: int) -> torch.nn.Module:
    """The case's model, routed and frozen as its phase trains."""
    torch.manual_seed(0)
    if case.series == "base":
        return build_model("deepfm", FIELDS, domains, AdapterConfig("none"))
    if case.series == "mlora":
        return build_model(
            "deepfm", FIELDS, domains, AdapterConfig("mlora", products=case.products)
        )
    top_k = 2 if case.series == "phase 3 top-2" else None
    adapter = AdapterConfig(
        "moe", experts=case.count, products=case.products, gate={"top_k": top_k}
    )
    model = build_model("deepfm", FIELDS, domains, adapter)
    if case.series == "phase 2":
        model.routing = "expert"
        set_trainable(model, backbone=False, experts=True, gate=False)
    else:
        set_trainable(model, backbone=False, experts=False, gate=True)
    return model


def cases() -> list[Case]:
    listed = [Case("base", 1, "-")]
    for domains in DOMAIN_COUNTS:
        listed += [Case("mlora", domains, p) for p in ("rows", "dense")]
    for experts in EXPERT_COUNTS:
        listed += [Case("phase 2", experts, p) for p in ("rows", "dense")]
        listed.append(Case("phase 3 dense", experts, "dense"))
        listed += [Case("phase 3 top-2", experts, p) for p in ("rows", "dense")]
    return listed


def run(skew: str, rounds: int, batches_per_round: int) -> list[Case]:
    listed = cases()
    for case in listed:
        domains = case.count if case.series in ("mlora", "phase 2") else 8
        domains = 2 if case.series == "base" else domains
        data = make_batches(domains, case.count, batches_per_round, skew)
        case.timer = StepTimer(build(case, domains), data)
    for index in range(rounds):
        start = time.perf_counter()
        for case in listed:
            case.timer.round()
        print(f"  round {index + 1}/{rounds}: {time.perf_counter() - start:.1f}s", flush=True)
    return listed


def table(listed: list[Case]) -> list[str]:
    base = listed[0].timer.seconds
    lines = [
        "| series | D or E | rows path: ms | x base | dense path: ms | x base |",
        "|---|---:|---:|---:|---:|---:|",
        f"| base | - | {base * 1e3:.2f} | 1.00 | | |",
    ]
    keyed = {(c.series, c.count, c.products): c.timer.seconds for c in listed[1:]}
    for series, count in dict.fromkeys((c.series, c.count) for c in listed[1:]):
        cells = []
        for products in ("rows", "dense"):
            seconds = keyed.get((series, count, products))
            cells += (
                ["", ""] if seconds is None else [f"{seconds * 1e3:.2f}", f"{seconds / base:.2f}"]
            )
        lines.append(f"| {series} | {count} | " + " | ".join(cells) + " |")
    return lines


def plot(listed: list[Case], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    base = listed[0].timer.seconds
    figure = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    for axis, names in ((left, ("mlora",)), (right, ("phase 2", "phase 3 dense", "phase 3 top-2"))):
        for name in names:
            for products, style in (("rows", "-o"), ("dense", "--x")):
                points = [
                    (c.count, c.timer.seconds / base)
                    for c in listed
                    if c.series == name and c.products == products
                ]
                if points:
                    axis.plot(*zip(*points, strict=True), style, label=f"{name}, {products} path")
        axis.set_xscale("log", base=2)
        axis.axhline(1.0, color="gray", linewidth=0.8)
        axis.set_ylabel("step time / base step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    left.set_xlabel("domains D (MLoRA: one adapter per domain)")
    left.axhline(1.15, color="tab:red", linestyle=":", linewidth=1, label="target 1.15x")
    right.set_xlabel("experts E (MoE-MLoRA)")
    right.axhline(1.3, color="tab:red", linestyle=":", linewidth=1)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m moe_mlora.bench scaling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument(
        "--domains",
        choices=("uniform", "zipf"),
        default="uniform",
        help="how rows are spread over domains and experts (default uniform)",
    )
    parser.add_argument(
        "--allocator",
        choices=MODES,
        default="tuned",
        help="glibc malloc settings (default tuned, as a run's default)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--batches", type=int, default=20, help="batches per round (default 20)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("experiments"),
        help="folder for scaling.md and scaling.png (default ./experiments)",
    )
    args = parser.parse_args(key_value_argv(parser, argv))
    torch.set_num_threads(args.threads)
    configure_allocator(args.allocator)
    print(f"scaling: {len(cases())} configurations, {args.rounds} rounds, {args.domains} domains")
    listed = run(args.domains, args.rounds, args.batches)
    lines = table(listed)
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.domains == "uniform" else f"_{args.domains}"
    image = args.out / f"scaling{suffix}.png"
    plot(listed, image)
    command = (
        f"python -m moe_mlora.bench scaling --threads {args.threads} --domains {args.domains}"
        f" --allocator {args.allocator}"
    )
    block = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC with `{command}` on "
        f"{platform.machine()}, torch {torch.__version__}, {args.threads} threads, batch {BATCH}, "
        f"{args.domains} domains, allocator {args.allocator}, best of {args.rounds} interleaved "
        "rounds.",
        "",
        *lines,
        "",
        f"![step time relative to base, {args.domains} domains]({image.name})",
    ]
    markdown = args.out / "scaling.md"
    write_block(markdown, args.domains, block)
    print(f"wrote {markdown} ({args.domains} section) and {image}")


def write_block(markdown: Path, key: str, block: list[str]) -> None:
    """Put ``block`` between this key's markers in ``markdown``, keeping all other text."""
    begin, end = f"<!-- bench scaling {key}: begin -->", f"<!-- bench scaling {key}: end -->"
    generated = "\n".join([begin, *block, end])
    text = markdown.read_text() if markdown.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + generated + rest.split(end, 1)[1]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + generated + "\n"
    markdown.write_text(text)


if __name__ == "__main__":
    main()
