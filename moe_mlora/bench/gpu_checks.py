"""Paths that only a GPU exercises, checked in one go: ``python -m moe_mlora.bench gpu_checks``.

Four checks, each printed as a row of one markdown table (and written to ``--out``):

* **CIN backward in bf16.** xDeepFM's CIN has a hand-written backward
  (``moe_mlora.models.cin``). Under bf16 autocast on the device, an xDeepFM training step
  must give finite gradients, and the CIN's own gradients (its weights and its input) must
  agree with autograd's backward of the same products within ``--tolerance`` (relative
  L2) and be no further from float32's than autograd's are.
* **Every method in bf16.** One training step under bf16 autocast of base, MLoRA and a
  top-2 MoE-MLoRA (each through the dense and the rows product path) and of every
  multi-domain tower, on DeepFM: every parameter gets a finite gradient.
* **bf16 training.** One epoch of xDeepFM with ``trainer.precision=bf16-mixed`` on generated
  Taobao-20 data, through the real run pipeline: it must finish with a finite test WAUC.
* **DDP on one device.** ``python -m moe_mlora.run trainer=ddp trainer.devices=1`` (a fresh
  process, as a user starts it) must exit 0 and write results.json with a finite test WAUC.

The process exits with status 1 when a check fails. ``--accelerator cpu`` runs the same
checks on the CPU (autocast bf16 on the CPU, DDP over gloo), which is how the tests run
them; the GPU figures of the speed issue come from ``python -m moe_mlora.bench gpu``.
``experiments/gpu/run_checks.sh`` runs both on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_mlora.cli import key_value_argv
from moe_mlora.data.processed import FieldSpec

# Field sizes of a small CTR table (index 0 is out-of-vocabulary); 3 domains.
FIELDS = [FieldSpec("user", 500), FieldSpec("item", 800), FieldSpec("category", 40)]
DOMAINS = 3
EMBEDDING_DIM = 8


@dataclass
class Check:
    """One check's outcome: its name, whether it passed, and what was measured."""

    name: str
    passed: bool
    detail: str
    seconds: float = 0.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moe_mlora.bench gpu_checks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"])
    parser.add_argument("--clicks", type=int, default=200_000, help="generated log size")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.02,
        help="largest relative L2 difference, under bf16, between the CIN's hand-written "
        "backward and autograd's (default 0.02)",
    )
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    return parser.parse_args(key_value_argv(parser, argv))


def device_of(accelerator: str) -> torch.device:
    return torch.device("cuda" if accelerator == "gpu" else "cpu")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``|got - want| / |want|`` in L2 (0 when both are zero)."""
    scale = want.float().norm().item()
    difference = (got.float() - want.float()).norm().item()
    return difference / scale if scale > 0 else difference


def plain_cin_products(x0: torch.Tensor, hidden: torch.Tensor, weight, bias) -> torch.Tensor:
    """A CIN layer's products through autograd's own backward (the reference)."""
    return torch.addmm(bias, (x0.unsqueeze(2) * hidden.unsqueeze(1)).flatten(1), weight)


def cin_bf16_gradients(accelerator: str, tolerance: float) -> Check:
    """xDeepFM under bf16 autocast: every gradient finite, and the CIN's hand-written
    backward as accurate as autograd's.

    The CIN runs on its own (embeddings in, a fixed projection of its output as the loss)
    three ways: under bf16 autocast with the hand-written backward and with autograd's, and
    in float32 with autograd's (the reference). Under bf16 the two backwards must agree
    within ``tolerance``, and ours may not stray further from float32 than autograd's does
    (bf16 itself moves the input's gradient by a few percent, with either backward).
    """
    from unittest import mock

    from moe_mlora.models import AdapterConfig, build_model
    from moe_mlora.models import cin as cin_module

    device = device_of(accelerator)
    torch.manual_seed(0)
    model = build_model("xdeepfm", FIELDS, DOMAINS, AdapterConfig("none"), EMBEDDING_DIM)
    model = model.to(device).train()
    generator = torch.Generator().manual_seed(1)
    sparse = torch.stack(
        [torch.randint(1, f.vocab_size, (512,), generator=generator) for f in FIELDS], 1
    ).to(device)
    domain = torch.randint(0, DOMAINS, (512,), generator=generator).to(device)
    label = torch.randint(0, 2, (512,), generator=generator).float().to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits = model(sparse, domain)
    torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), label).backward()
    nonfinite = [
        n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
    ]

    embeddings = torch.randn(512, len(FIELDS), EMBEDDING_DIM, generator=generator).to(device)
    projection = torch.randn(model.cin.output_dim, generator=generator).to(device)

    def cin_gradients(bf16: bool, autograd: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        inputs = embeddings.clone().requires_grad_()
        with mock.patch.object(
            cin_module._CINProductsMatmul,
            "apply",
            plain_cin_products if autograd else cin_module._CINProductsMatmul.apply,
        ):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model.cin(inputs)
            (out.float() @ projection).square().mean().backward()
        grads = {f"cin.{n}": p.grad.detach().clone() for n, p in model.cin.named_parameters()}
        return {**grads, "CIN input": inputs.grad.detach().clone()}

    reference = cin_gradients(bf16=False, autograd=True)  # float32, autograd's backward
    ours, autograds = cin_gradients(bf16=True, autograd=False), cin_gradients(True, True)
    nonfinite += [name for name, grad in ours.items() if not torch.isfinite(grad).all()]
    apart = {name: relative_error(ours[name], autograds[name]) for name in ours}
    ours_off = {name: relative_error(ours[name], reference[name]) for name in ours}
    theirs_off = {name: relative_error(autograds[name], reference[name]) for name in ours}
    strays = [name for name in ours if ours_off[name] > 1.5 * theirs_off[name] + 1e-3]
    passed = not nonfinite and not strays and max(apart.values()) <= tolerance
    worst = max(ours_off, key=ours_off.__getitem__)
    detail = (
        f"xDeepFM step's gradients {'finite' if not nonfinite else 'NOT finite: '}"
        f"{', '.join(nonfinite)}; CIN under bf16, ours vs autograd's backward: largest "
        f"relative difference {max(apart.values()):.4f}; against float32: ours "
        f"{ours_off[worst]:.4f}, autograd's {theirs_off[worst]:.4f} ({worst})"
    )
    if strays:
        detail += f"; further from float32 than autograd's: {', '.join(strays)}"
    return Check("CIN backward, bf16 autocast", passed, detail)


def every_method_bf16_step(accelerator: str) -> Check:
    """One training step of every adapter and multi-domain tower on DeepFM under bf16
    autocast, each LoRA routing through both product paths: every gradient finite."""
    from moe_mlora.models import AdapterConfig, build_model
    from moe_mlora.models.multidomain import TOWERS

    device = device_of(accelerator)
    generator = torch.Generator().manual_seed(3)
    sparse = torch.stack(
        [torch.randint(1, f.vocab_size, (1024,), generator=generator) for f in FIELDS], 1
    ).to(device)
    domain = torch.randint(0, DOMAINS, (1024,), generator=generator).to(device)
    label = torch.randint(0, 2, (1024,), generator=generator).float().to(device)
    variants: dict[str, dict] = {"base": {}}
    for products in ("dense", "rows"):
        variants[f"mlora ({products})"] = {"adapter": AdapterConfig("mlora", products=products)}
        top_2 = AdapterConfig("moe", experts=8, products=products, gate={"top_k": 2})
        variants[f"moe top-2 ({products})"] = {"adapter": top_2}
    variants |= {kind: {"tower": {"kind": kind}} for kind in TOWERS}
    failed = []
    for name, options in variants.items():
        torch.manual_seed(0)
        adapter = options.get("adapter", AdapterConfig("none"))
        tower = options.get("tower")
        model = build_model("deepfm", FIELDS, DOMAINS, adapter, tower=tower).to(device).train()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(sparse, domain)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), label)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        if any(g is None or not torch.isfinite(g).all() for g in grads):
            failed.append(name)
    detail = f"{len(variants) - len(failed)} of {len(variants)} finite: {', '.join(variants)}"
    if failed:
        detail += f"; missing or not finite: {', '.join(failed)}"
    return Check("every method, one bf16 step", not failed, detail)


def run_overrides(accelerator: str, clicks: int, cache: Path) -> list[str]:
    """A short xDeepFM run on generated Taobao-20 data."""
    return [
        "data=taobao20",
        "data.generate_if_missing=true",
        f"data.generator.clicks={clicks}",
        "model=xdeepfm",
        "method=base",
        f"trainer={'gpu' if accelerator == 'gpu' else 'default'}",
        f"trainer.accelerator={accelerator}",
        "trainer.max_epochs=1",
        "logger.wandb.enabled=false",
        "checkpoint=false",
        "progress=false",
        f"paths.cache_dir={cache}",
    ]


def finite_wauc(results: dict) -> tuple[bool, str]:
    wauc = results.get("test", {}).get("wauc")
    if wauc is None or not math.isfinite(wauc):
        return False, f"test WAUC {wauc!r}"
    return True, f"test WAUC {wauc:.4f}"


def bf16_training(accelerator: str, clicks: int, cache: Path) -> Check:
    """One epoch of xDeepFM in bf16-mixed through the run pipeline."""
    from moe_mlora.config import compose
    from moe_mlora.pipeline.runner import train_and_evaluate

    cfg = compose([*run_overrides(accelerator, clicks, cache), "trainer.precision=bf16-mixed"])
    with tempfile.TemporaryDirectory() as scratch:
        results = train_and_evaluate(cfg, Path(scratch) / "run")
    passed, detail = finite_wauc(results)
    return Check("xDeepFM training, bf16-mixed", passed, detail)


def ddp_one_device(accelerator: str, clicks: int, cache: Path) -> Check:
    """``trainer=ddp trainer.devices=1`` in a fresh process, as a user runs it."""
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(scratch) / "run"
        overrides = run_overrides(accelerator, clicks, cache)
        overrides = [o for o in overrides if not o.startswith("trainer=")]  # ddp's, not gpu's
        overrides += ["trainer=ddp", "trainer.devices=1", f"hydra.run.dir={run_dir}"]
        command = [sys.executable, "-m", "moe_mlora.run", *overrides]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
        results_file = run_dir / "results.json"
        if done.returncode != 0 or not results_file.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return Check("DDP, one device", False, f"exit {done.returncode}: {' / '.join(tail)}")
        passed, detail = finite_wauc(json.loads(results_file.read_text()))
    return Check("DDP, one device", passed, detail)


def timed(name: str, check: Callable[[], Check]) -> Check:
    """Run ``check``; one that raises has failed (and the others still run)."""
    start = time.perf_counter()
    try:
        outcome = check()
    except Exception as error:
        outcome = Check(name, False, f"{type(error).__name__}: {error}")
    outcome.seconds = time.perf_counter() - start
    return outcome


def table(checks: list[Check], accelerator: str) -> str:
    device = torch.cuda.get_device_name() if accelerator == "gpu" else "CPU"
    lines = [
        f"GPU-path checks on {device}, torch {torch.__version__}",
        "",
        "| check | result | detail | s |",
        "|---|---|---|---|",
    ]
    for check in checks:
        result = "pass" if check.passed else "FAIL"
        lines.append(f"| {check.name} | {result} | {check.detail} | {check.seconds:.1f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from moe_mlora.data.cache import default_cache_dir

    args = parse_args(argv)
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run on a GPU machine or pass --accelerator cpu")
    cache = default_cache_dir()
    accelerator, clicks, tolerance = args.accelerator, args.clicks, args.tolerance
    checks = [
        timed("CIN backward, bf16 autocast", lambda: cin_bf16_gradients(accelerator, tolerance)),
        timed("every method, one bf16 step", lambda: every_method_bf16_step(accelerator)),
        timed("xDeepFM training, bf16-mixed", lambda: bf16_training(accelerator, clicks, cache)),
        timed("DDP, one device", lambda: ddp_one_device(accelerator, clicks, cache)),
    ]
    text = table(checks, args.accelerator)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if not all(check.passed for check in checks):
        raise SystemExit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
