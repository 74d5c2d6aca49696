"""Parity and speed against DeepCTR-Torch: ``python -m moe_mlora.bench parity [options]``.

Trains every backbone back to back in DeepCTR-Torch 0.3.0 and in our ``method=base``, on the
same MovieLens split (our loader: gender domains, fields user / item / domain, per-domain
stratified 60/20/20, split seed 123), with the protocol of docs/method.md: embedding 8, tower
256-128-64, dropout 0.5, Adam lr 1e-3, batch 1024, BCE, early stopping with patience 3 on
validation WAUC, the best weights tested once. Seeds (default 1 2 3) set model init, dropout
and shuffling on both sides. Prints (and writes as markdown) per backbone: test AUC and WAUC
mean ± std, epochs, training samples/second, our/their AUC difference and speed ratio,
PASS/FAIL against the targets, plus our MoE-MLoRA (E experts) throughput against their base.

Needs the optional extra: ``make install-bench`` (installs deepctr-torch with torch pinned).

This file is longer than the package's other modules (about 750 lines) because it carries,
beside the two training loops, the method text it writes into ``experiments/parity.md``
(how the comparison is made fair, about 120 lines). The text stays next to the code it
describes, so that changing one shows the other.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from moe_mlora.bench.core import DEFAULT_ROOT, ROOT_HINT
from moe_mlora.cli import key_value_argv

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = REPO / "experiments" / "parity.md"

#: Our backbone name -> DeepCTR-Torch class name (the backbones both libraries have).
DEEPCTR_CLASSES = {
    "wdl": "WDL",
    "deepfm": "DeepFM",
    "nfm": "NFM",
    "autoint": "AutoInt",
    "pnn": "PNN",
    "dcn": "DCN",
    "xdeepfm": "xDeepFM",
    "fibinet": "FiBiNET",
}

# Targets (issue 3).
AUC_TOLERANCE = 0.003  # our 3-seed mean test AUC >= theirs - this
SPEED_TARGET = 1.5  # our base training samples/s >= this x theirs
MOE_SPEED_TARGET = 1.0  # our MoE-MLoRA training samples/s >= this x their base

EMBEDDING_DIM = 8
HIDDEN_UNITS = (256, 128, 64)
DROPOUT = 0.5
LR = 1e-3
BATCH_SIZE = 1024
PATIENCE = 3
EVAL_BATCH_SIZE = 65536

INSTALL_HINT = (
    "deepctr-torch is not installed; the parity benchmark needs the optional `bench` extra. "
    "Install it with `make install-bench` (pip install -e '.[bench]' with the venv's torch "
    "pinned, so torch is not replaced)."
)

FAIRNESS_NOTES = f"""\
- **Same data.** Both libraries get the tensors of our MovieLens loader
  (`prepare_movielens(root, "gender")`: fields user, item, domain; per-domain stratified
  60/20/20, split seed 123), so train / validation / test rows are identical. Their side sees
  the fields as `SparseFeat`s with our vocabulary sizes.
- **Same protocol.** Embedding {EMBEDDING_DIM}, DNN {"-".join(map(str, HIDDEN_UNITS))}, dropout
  {DROPOUT}, Adam lr {LR}, batch {BATCH_SIZE}, BCE; everything else at each library's defaults
  (DeepCTR: L2 1e-5 on embeddings and linear weights, init std 1e-4, loss summed over the
  batch). Early stopping on validation WAUC with patience {PATIENCE}, best weights restored,
  test once, both computed with our exact `DomainAUC` on both sides.
- **Seeds.** The seed sets model init, dropout and batch order on both sides
  (`torch.manual_seed(seed)` plus DeepCTR's own `seed=` argument, which otherwise re-seeds
  every model with 1024; `seed=` / `L.seed_everything` on ours). The data split stays seed 123.
- **Dropout really on in DeepCTR.** DeepCTR-Torch 0.3.0's `fit` calls `self.train()` once
  before its epoch loop, but its per-epoch validation (`evaluate` -> `predict`) calls
  `self.eval()` and never switches back, so in a multi-epoch `fit(validation_data=...)`
  dropout is silently off from the second epoch on. Here their training is driven one epoch
  at a time: `model.train()` then `fit(x, y, batch_size={BATCH_SIZE}, epochs=1, shuffle=True,
  verbose=0)` with no validation inside `fit`; validation runs outside with `predict`. A
  forward pre-hook on every `Dropout` (p > 0) counts its calls in train and eval mode while
  `fit` runs, and the benchmark stops if any training forward saw dropout off.
- **Timing (training only, wall clock, the same way on both sides).** Theirs: the wall time of
  each one-epoch `fit` call (their whole training loop: tensor conversion, DataLoader,
  forward, L2 penalty, backward, Adam). Ours: per epoch, from Lightning's train-epoch start to
  the end of its last training batch (batch fetching, forward, backward, Adam and Lightning's
  loop overhead; validation excluded), by a callback added to each phase's Trainer. Training
  samples/s = training samples / that time, over all epochs of the run. Our results.json's
  `train_samples_per_s` (timed over training steps only, without batch fetching) is shown
  too, for reference; PASS/FAIL uses the wall-clock figure.
- **MoE-MLoRA throughput.** Its fair training throughput is all training samples of its three
  phases (backbone, experts, gate) over all their training wall time, i.e. what a user
  waits per sample trained; the slowest single phase is shown as well. Its target is >= 1.0x
  DeepCTR's *base* model of the same backbone.
- **Threads.** `torch.set_num_threads(threads)` for both sides, in one process, runs
  interleaved per seed (theirs, then ours) so machine noise hits both alike.
- **Allocator.** moe_mlora tunes glibc's malloc (`allocator=tuned`, a run's default;
  `moe_mlora/allocator.py`: big per-step temporaries stay in the heap instead of fresh
  page-faulted mmaps). The setting is process-wide, so the benchmark applies `--allocator`
  once, before the first run, to both libraries alike. Its default, `--allocator default`,
  leaves glibc as it is for both, as DeepCTR-Torch's users run it; our base backbones'
  steps do not page-fault under either setting, so they lose nothing. `--allocator tuned` runs
  both tuned; that helps DeepCTR-Torch's xDeepFM most (its Conv1d CIN page-faults with
  glibc's defaults: 14.5k -> 19.3k samples/s) and leaves ours about where it was, so
  xDeepFM's ratio drops to 1.48x there; both tables are in `experiments/`."""


# ----------------------------------------------------------------- records
@dataclass
class RunRecord:
    """One training run (one library, backbone, seed)."""

    library: str  # "ours", "deepctr", "ours-moe"
    model: str
    seed: int
    test_auc: float
    test_wauc: float
    epochs: int
    best_epoch: int
    train_samples: int
    train_seconds: float  # wall clock of training (see FAIRNESS_NOTES)
    step_samples_per_s: float = math.nan  # ours: results.json's step-timed figure
    phases: list[dict] = field(default_factory=list)  # MoE: per phase samples / seconds

    @property
    def samples_per_s(self) -> float:
        return self.train_samples / self.train_seconds if self.train_seconds > 0 else math.nan


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``nan`` for fewer than two values)."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclass
class Side:
    auc: tuple[float, float]
    wauc: tuple[float, float]
    epochs: float
    samples_per_s: float
    step_samples_per_s: float
    seeds: int


def side_summary(records: Sequence[RunRecord]) -> Side:
    return Side(
        auc=mean_std([r.test_auc for r in records]),
        wauc=mean_std([r.test_wauc for r in records]),
        epochs=mean_std([r.epochs for r in records])[0],
        samples_per_s=mean_std([r.samples_per_s for r in records])[0],
        step_samples_per_s=mean_std([r.step_samples_per_s for r in records])[0],
        seeds=len(records),
    )


@dataclass
class Comparison:
    model: str
    ours: Side
    theirs: Side
    auc_diff: float  # ours - theirs, 3-seed means
    speed_ratio: float  # ours / theirs, training samples/s
    accuracy_pass: bool
    speed_pass: bool

    @property
    def passed(self) -> bool:
        return self.accuracy_pass and self.speed_pass


@dataclass
class MoEComparison:
    model: str
    moe: Side
    slowest_phase: str
    slowest_phase_samples_per_s: float
    theirs_base_samples_per_s: float
    ratio: float
    slowest_ratio: float
    passed: bool


def compare(model: str, ours: Sequence[RunRecord], theirs: Sequence[RunRecord]) -> Comparison:
    """Summaries of both sides and the verdict against the targets."""
    mine, other = side_summary(ours), side_summary(theirs)
    diff = mine.auc[0] - other.auc[0]
    ratio = mine.samples_per_s / other.samples_per_s
    return Comparison(
        model=model,
        ours=mine,
        theirs=other,
        auc_diff=diff,
        speed_ratio=ratio,
        accuracy_pass=bool(diff >= -AUC_TOLERANCE),
        speed_pass=bool(ratio >= SPEED_TARGET),
    )


def compare_moe(model: str, moe: Sequence[RunRecord], theirs: Sequence[RunRecord]) -> MoEComparison:
    summary = side_summary(moe)
    their_speed = side_summary(theirs).samples_per_s
    kinds = [p["kind"] for p in moe[0].phases] if moe else []
    per_phase = {
        kind: mean_std(
            [
                p["samples"] / p["seconds"] if p["seconds"] > 0 else math.nan
                for r in moe
                for p in r.phases
                if p["kind"] == kind
            ]
        )[0]
        for kind in kinds
    }
    slowest = min(per_phase, key=per_phase.get) if per_phase else "-"
    slowest_speed = per_phase.get(slowest, math.nan)
    ratio = summary.samples_per_s / their_speed
    return MoEComparison(
        model=model,
        moe=summary,
        slowest_phase=slowest,
        slowest_phase_samples_per_s=slowest_speed,
        theirs_base_samples_per_s=their_speed,
        ratio=ratio,
        slowest_ratio=slowest_speed / their_speed,
        passed=bool(ratio >= MOE_SPEED_TARGET),
    )


# -------------------------------------------------------------- formatting
def _pm(pair: tuple[float, float]) -> str:
    mean, std = pair
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.4f} ± {std:.4f}" if not math.isnan(std) else f"{mean:.4f}"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


COMPARISON_HEADER = (
    "backbone",
    "ours AUC",
    "DeepCTR AUC",
    "ours WAUC",
    "DeepCTR WAUC",
    "epochs ours/DeepCTR",
    "samples/s ours",
    "samples/s DeepCTR",
    "ours step-timed samples/s",
    "AUC diff",
    "speed ratio",
    "accuracy",
    "speed",
)


def comparison_row(c: Comparison) -> list[str]:
    return [
        c.model,
        _pm(c.ours.auc),
        _pm(c.theirs.auc),
        _pm(c.ours.wauc),
        _pm(c.theirs.wauc),
        f"{c.ours.epochs:.1f} / {c.theirs.epochs:.1f}",
        f"{c.ours.samples_per_s:,.0f}",
        f"{c.theirs.samples_per_s:,.0f}",
        f"{c.ours.step_samples_per_s:,.0f}",
        f"{c.auc_diff:+.4f}",
        f"{c.speed_ratio:.2f}x",
        _verdict(c.accuracy_pass),
        _verdict(c.speed_pass),
    ]


MOE_HEADER = (
    "backbone",
    "MoE-MLoRA AUC",
    "MoE-MLoRA WAUC",
    "samples/s (all phases)",
    "slowest phase samples/s",
    "DeepCTR base samples/s",
    "ratio (all phases)",
    "ratio (slowest phase)",
    "speed",
)


def moe_row(m: MoEComparison) -> list[str]:
    return [
        m.model,
        _pm(m.moe.auc),
        _pm(m.moe.wauc),
        f"{m.moe.samples_per_s:,.0f}",
        f"{m.slowest_phase_samples_per_s:,.0f} ({m.slowest_phase})",
        f"{m.theirs_base_samples_per_s:,.0f}",
        f"{m.ratio:.2f}x",
        f"{m.slowest_ratio:.2f}x",
        _verdict(m.passed),
    ]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


RUN_HEADER = (
    "library",
    "backbone",
    "seed",
    "test AUC",
    "test WAUC",
    "epochs",
    "best epoch",
    "train samples",
    "train s",
    "samples/s",
)


def run_row(r: RunRecord) -> list[str]:
    return [
        r.library,
        r.model,
        str(r.seed),
        f"{r.test_auc:.4f}",
        f"{r.test_wauc:.4f}",
        str(r.epochs),
        str(r.best_epoch),
        str(r.train_samples),
        f"{r.train_seconds:.2f}",
        f"{r.samples_per_s:,.0f}",
    ]


def verdict_line(comparisons: Sequence[Comparison], moes: Sequence[MoEComparison]) -> str:
    acc = sum(c.accuracy_pass for c in comparisons)
    speed = sum(c.speed_pass for c in comparisons)
    moe = sum(m.passed for m in moes)
    return (
        f"accuracy (ours >= DeepCTR - {AUC_TOLERANCE}): {acc}/{len(comparisons)} PASS; "
        f"speed (ours >= {SPEED_TARGET}x DeepCTR): {speed}/{len(comparisons)} PASS; "
        f"MoE-MLoRA (>= {MOE_SPEED_TARGET}x DeepCTR base): {moe}/{len(moes)} PASS"
    )


def render_markdown(
    command: str,
    args: argparse.Namespace,
    comparisons: Sequence[Comparison],
    moes: Sequence[MoEComparison],
    records: Sequence[RunRecord],
    skipped: dict[str, str],
    wall_s: float,
) -> str:
    import deepctr_torch

    machine = (
        f"{platform.platform()}, {platform.processor() or platform.machine()}; nproc "
        f"{os.cpu_count()}, torch threads {args.threads}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, deepctr-torch {deepctr_torch.__version__}"
    )
    parts = [
        "# Parity and speed against DeepCTR-Torch",
        "",
        f"Generated by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} "
        f"({wall_s / 60:.1f} min).",
        "",
        f"- Data: `{args.root}` (gender split), seeds {' '.join(map(str, args.seeds))}, "
        f"max epochs {args.max_epochs}.",
        f"- Machine: {machine}.",
        f"- Allocator: `{args.allocator}` for both libraries (set once, before the first run).",
        f"- Targets: our 3-seed mean test AUC >= DeepCTR's - {AUC_TOLERANCE}; our training "
        f"samples/s >= {SPEED_TARGET}x DeepCTR's; our MoE-MLoRA (E = {args.experts}) >= "
        f"{MOE_SPEED_TARGET}x DeepCTR's base.",
        f"- Verdict: {verdict_line(comparisons, moes)}.",
        "",
        "## Base backbones: ours vs DeepCTR-Torch",
        "",
        markdown_table(COMPARISON_HEADER, [comparison_row(c) for c in comparisons])
        if comparisons
        else "(no backbone compared)",
        "",
        "AUC and WAUC: test set, mean ± sample std over seeds. Samples/s: training wall clock "
        "(see the notes). AUC diff: ours - DeepCTR (means).",
        "",
    ]
    if moes:
        parts += [
            f"## MoE-MLoRA (E = {args.experts}) against DeepCTR-Torch's base model",
            "",
            markdown_table(MOE_HEADER, [moe_row(m) for m in moes]),
            "",
        ]
    if skipped:
        parts += ["## Skipped", ""]
        parts += [f"- {name}: {why}" for name, why in skipped.items()]
        parts.append("")
    parts += ["## How the comparison is made fair", "", FAIRNESS_NOTES, ""]
    parts += [
        "## Every run",
        "",
        markdown_table(RUN_HEADER, [run_row(r) for r in records]),
        "",
    ]
    return "\n".join(parts)


# ------------------------------------------------------------- DeepCTR side
def require_deepctr():
    try:
        import deepctr_torch
        import deepctr_torch.models
    except ImportError as error:
        raise SystemExit(f"moe_mlora.bench parity: {INSTALL_HINT} ({error})") from error
    return deepctr_torch


class DropoutAudit:
    """Counts the calls of every Dropout (p > 0) of a model in train and in eval mode."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.train_calls = 0
        self.eval_calls = 0
        self.active = False
        self.modules = [
            m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)
        ]
        self.modules = [m for m in self.modules if m.p > 0]
        for module in self.modules:
            module.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, _inputs) -> None:
        if not self.active:
            return
        if module.training:
            self.train_calls += 1
        else:
            self.eval_calls += 1


def _predict(model, x: dict[str, np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(model.predict(x, batch_size=EVAL_BATCH_SIZE)).reshape(-1).float()


def _evaluate(model, x, split, data) -> dict:
    from moe_mlora.metrics import DomainAUC

    metric = DomainAUC(data.num_domains, data.domain_names)
    metric.update(_predict(model, x), split.label, split.domain)
    return metric.compute()


def _deepctr_inputs(data, split) -> dict[str, np.ndarray]:
    return {name: split.sparse[:, i].numpy() for i, name in enumerate(data.field_names)}


def build_deepctr_model(name: str, data, seed: int):
    import deepctr_torch.models as models
    from deepctr_torch.inputs import SparseFeat

    columns = [SparseFeat(f.name, f.vocab_size, embedding_dim=EMBEDDING_DIM) for f in data.fields]
    cls = getattr(models, DEEPCTR_CLASSES[name])
    options = dict(dnn_hidden_units=HIDDEN_UNITS, dnn_dropout=DROPOUT, seed=seed, device="cpu")
    torch.manual_seed(seed)
    if name == "pnn":  # PNN takes the DNN columns only
        model = cls(dnn_feature_columns=columns, **options)
    else:
        model = cls(columns, columns, **options)
    model.compile(torch.optim.Adam(model.parameters(), lr=LR), "binary_crossentropy")
    return model


def run_deepctr(name: str, data, seed: int, max_epochs: int) -> RunRecord:
    """Their model, one ``fit`` epoch at a time, dropout on, early stopping on val WAUC."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = build_deepctr_model(name, data, seed)
    audit = DropoutAudit(model)
    if not audit.modules:
        raise RuntimeError(f"DeepCTR {name}: no Dropout module found; is dnn_dropout applied?")
    train, val, test = (data.splits[s] for s in ("train", "val", "test"))
    x_train, y_train = _deepctr_inputs(data, train), train.label.numpy().astype(np.float32)
    x_val, x_test = _deepctr_inputs(data, val), _deepctr_inputs(data, test)
    best, best_epoch, wait, best_state = -math.inf, -1, 0, None
    seconds, epochs = 0.0, 0
    for epoch in range(max_epochs):
        model.train()  # fit() does this too in 0.3.0; predict() below leaves the model in eval
        audit.active = True
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # fit prints the device and a banner
            model.fit(x_train, y_train, batch_size=BATCH_SIZE, epochs=1, shuffle=True, verbose=0)
        seconds += time.perf_counter() - start
        audit.active = False
        epochs += 1
        wauc = _evaluate(model, x_val, val, data)["wauc"]
        if not math.isnan(wauc) and wauc > best:
            best, best_epoch, wait = wauc, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            wait += 1
            if wait >= PATIENCE:
                break
    if audit.eval_calls or not audit.train_calls:
        raise RuntimeError(
            f"DeepCTR {name}: dropout was off in {audit.eval_calls} of "
            f"{audit.eval_calls + audit.train_calls} training forward calls"
        )
    if best_state is not None:
        model.load_state_dict(best_state)
    result = _evaluate(model, x_test, test, data)
    return RunRecord(
        library="deepctr",
        model=name,
        seed=seed,
        test_auc=result["auc"],
        test_wauc=result["wauc"],
        epochs=epochs,
        best_epoch=best_epoch,
        train_samples=epochs * len(train),
        train_seconds=seconds,
    )


# ----------------------------------------------------------------- our side
def run_ours(
    name: str,
    root: Path,
    seed: int,
    threads: int,
    max_epochs: int,
    output: Path,
    experts: int | None = None,
    allocator: str = "default",
) -> RunRecord:
    from moe_mlora.config import compose
    from moe_mlora.pipeline.runner import train_and_evaluate

    method = "moe_mlora" if experts else "base"
    overrides = [
        "data=movielens_gender",
        f"data.root={root}",
        f"model={name}",
        f"method={method}",
        f"seed={seed}",
        f"threads={threads}",
        f"allocator={allocator}",
        f"trainer.max_epochs={max_epochs}",
        "logger.wandb.enabled=false",
        "progress=false",
    ]
    if experts:  # the paper's three phases: the "all phases" figure of parity.md
        overrides += [f"experts={experts}", "method/schedule=paper"]
    with contextlib.redirect_stdout(io.StringIO()):
        results = train_and_evaluate(compose(overrides), output)
    reported = results["phases"]
    phases = [
        {"kind": p["kind"], "samples": p["train_samples"], "seconds": p["train_wall_seconds"]}
        for p in reported
    ]
    train_samples = sum(p["train_samples"] for p in reported)
    step_seconds = sum(p["train_seconds"] for p in reported)
    return RunRecord(
        library="ours-moe" if experts else "ours",
        model=name,
        seed=seed,
        test_auc=results["test"]["auc"],
        test_wauc=results["test"]["wauc"],
        epochs=sum(p["epochs"] for p in reported),
        best_epoch=reported[0]["best_epoch"] if len(reported) == 1 else -1,
        train_samples=train_samples,
        train_seconds=sum(p["train_wall_seconds"] for p in reported),
        step_samples_per_s=train_samples / step_seconds if step_seconds else math.nan,
        phases=phases,
    )


# ---------------------------------------------------------------- top level
def our_backbones() -> set[str]:
    from moe_mlora.config import CONF_DIR
    from moe_mlora.models.backbones import MODELS

    return {name for name in MODELS if (CONF_DIR / "model" / f"{name}.yaml").exists()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moe_mlora.bench parity",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument(
        "--root", type=Path, default=DEFAULT_ROOT, help=f"MovieLens folder (default {DEFAULT_ROOT})"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(DEEPCTR_CLASSES),
        choices=list(DEEPCTR_CLASSES),
        metavar="NAME",
        help=f"backbones (default: all of {' '.join(DEEPCTR_CLASSES)}); ones our registry "
        "lacks are skipped with a note",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="default 1 2 3")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument(
        "--max-epochs", type=int, default=50, help="epoch cap per run and phase (default 50)"
    )
    parser.add_argument("--experts", type=int, default=8, help="MoE-MLoRA experts (default 8)")
    parser.add_argument(
        "--moe-models",
        nargs="*",
        default=["deepfm"],
        metavar="NAME",
        help="backbones for the MoE-MLoRA speed line (default deepfm; none to skip)",
    )
    parser.add_argument(
        "--allocator",
        choices=["default", "tuned"],
        default="default",
        help="glibc malloc setting for the whole process, both libraries alike (default: glibc's)",
    )
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help=f"markdown (default {DEFAULT_OUTPUT})"
    )
    parser.add_argument(
        "--runs-dir", type=Path, default=None, help="keep our runs' folders here (default: temp)"
    )
    return parser.parse_args(key_value_argv(parser, argv))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    require_deepctr()
    if not args.root.exists():
        raise SystemExit(
            f"moe_mlora.bench parity: MovieLens folder {args.root} not found; {ROOT_HINT}"
        )
    command = shlex.join(["python", "-m", "moe_mlora.bench", "parity", *argv])
    torch.set_num_threads(args.threads)
    from moe_mlora.allocator import configure_allocator

    configure_allocator(args.allocator)  # before any run: both libraries train under it

    from moe_mlora.data.movielens import prepare_movielens
    from moe_mlora.pipeline.build import quiet_lightning

    quiet_lightning()
    available = our_backbones()
    skipped = {
        name: "not in moe_mlora.models.backbones.MODELS (or no conf/model file) yet"
        for name in args.models
        if name not in available
    }
    models = [name for name in args.models if name in available]
    moe_models = [name for name in args.moe_models if name in models]
    for name in args.moe_models:
        if name not in models:
            skipped.setdefault(f"{name} (MoE-MLoRA)", "not among the compared backbones")
    for name, why in skipped.items():
        print(f"parity: skipping {name}: {why}", flush=True)

    data = prepare_movielens(args.root, "gender")
    print(
        f"parity: {args.root} gender split, train/val/test "
        f"{'/'.join(str(len(data.splits[s])) for s in ('train', 'val', 'test'))}; "
        f"backbones {' '.join(models) or '-'}; seeds {' '.join(map(str, args.seeds))}; "
        f"{args.threads} threads",
        flush=True,
    )
    start = time.perf_counter()
    records: list[RunRecord] = []
    with tempfile.TemporaryDirectory() as scratch:
        runs_dir = args.runs_dir or Path(scratch)
        for name in models:
            for seed in args.seeds:
                jobs = [("deepctr", None), ("ours", None)]
                if name in moe_models:
                    jobs.append(("ours-moe", args.experts))
                for library, experts in jobs:
                    torch.set_num_threads(args.threads)
                    if library == "deepctr":
                        record = run_deepctr(name, data, seed, args.max_epochs)
                    else:
                        folder = runs_dir / f"{name}-{library}-s{seed}"
                        record = run_ours(
                            name,
                            args.root,
                            seed,
                            args.threads,
                            args.max_epochs,
                            folder,
                            experts,
                            args.allocator,
                        )
                    records.append(record)
                    print(
                        f"  {library:<8} {name:<8} seed {seed}: test AUC {record.test_auc:.4f} "
                        f"WAUC {record.test_wauc:.4f}, {record.epochs} epochs, "
                        f"{record.samples_per_s:,.0f} samples/s "
                        f"[{(time.perf_counter() - start) / 60:.1f} min]",
                        flush=True,
                    )
    wall = time.perf_counter() - start

    def pick(library: str, name: str) -> list[RunRecord]:
        return [r for r in records if r.library == library and r.model == name]

    comparisons = [compare(n, pick("ours", n), pick("deepctr", n)) for n in models]
    moes = [compare_moe(n, pick("ours-moe", n), pick("deepctr", n)) for n in moe_models]
    print(f"\n== parity with DeepCTR-Torch: {args.root.name} gender, {args.threads} threads ==")
    if comparisons:
        print(text_table(COMPARISON_HEADER, [comparison_row(c) for c in comparisons]))
    if moes:
        print(f"\nMoE-MLoRA (E = {args.experts}) vs DeepCTR-Torch base:")
        print(text_table(MOE_HEADER, [moe_row(m) for m in moes]))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    print(verdict_line(comparisons, moes))
    markdown = render_markdown(command, args, comparisons, moes, records, skipped, wall)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(markdown)
    print(f"written: {args.output}  ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
