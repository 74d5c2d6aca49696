"""xDeepFM step time by CIN implementation and allocator: ``python -m moe_mlora.bench cin``.

Our :class:`~moe_mlora.models.cin.CIN` (channel-last products, hand-written
backward) against the ``nn.Conv1d`` formulation of DeepCTR-Torch (same math,
same initial weights), each inside our xDeepFM, in a plain training loop
(fused Adam, BCE, batches of 1024 real ML-100K rows, gender split), rounds
interleaved so machine noise hits both alike. Each allocator mode runs in its
own process, because ``allocator=tuned`` cannot be undone in a process::

    python -m moe_mlora.bench cin             # $MOE_MLORA_ML100K or data/ml-100k, 2 threads
    python -m moe_mlora.bench cin --rounds 3 --steps 10

Prints the median and fastest milliseconds per step and samples/second for
every (allocator, CIN) pair.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_mlora.bench.core import DEFAULT_ROOT, require_ml100k
from moe_mlora.cli import key_value_argv

ALLOCATORS = ("default", "tuned")
BATCH_SIZE = 1024


class Conv1dCIN(nn.Module):
    """DeepCTR-Torch's CIN formulation (``nn.Conv1d`` over ``[B, F * H, dim]``), for reference.

    Initialised from a :class:`~moe_mlora.models.cin.CIN` so both start from the same
    weights; the forward is the previous implementation of ours.
    """

    def __init__(self, cin: nn.Module) -> None:
        super().__init__()
        self.split_half = cin.split_half
        self.convs = nn.ModuleList()
        for layer in cin.maps:
            in_features, out_features = layer.weight.shape
            conv = nn.Conv1d(in_features, out_features, kernel_size=1)
            with torch.no_grad():
                conv.weight.copy_(layer.weight.t().unsqueeze(-1))
                conv.bias.copy_(layer.bias)
            self.convs.append(conv)

    def forward(self, embeddings: Tensor) -> Tensor:
        x0 = hidden = embeddings
        last = len(self.convs) - 1
        outputs = []
        for i, conv in enumerate(self.convs):
            maps = torch.relu(conv((x0.unsqueeze(2) * hidden.unsqueeze(1)).flatten(1, 2)))
            if self.split_half and i < last:
                hidden, direct = maps.split(maps.shape[1] // 2, dim=1)
            else:
                hidden = direct = maps
            outputs.append(direct.sum(-1))
        return torch.cat(outputs, dim=1)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m moe_mlora.bench cin", description=__doc__)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="MovieLens-100K folder")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per pair (default 7)")
    parser.add_argument("--steps", type=int, default=40, help="training steps a round (default 40)")
    parser.add_argument("--worker", choices=ALLOCATORS, help=argparse.SUPPRESS)
    return parser.parse_args(key_value_argv(parser, argv))


def time_steps(args: argparse.Namespace) -> dict[str, list[float]]:
    """In this process (allocator already set): ms per step of each CIN, per round."""
    from moe_mlora.data.movielens import prepare_movielens
    from moe_mlora.models.backbones import build_model

    data = prepare_movielens(args.root, "gender")
    train = data.splits["train"]
    batches = [
        (
            train.sparse[i : i + BATCH_SIZE],
            train.label[i : i + BATCH_SIZE].float(),
            train.domain[i : i + BATCH_SIZE],
        )
        for i in range(0, min(len(train), args.steps * BATCH_SIZE), BATCH_SIZE)
    ]
    steps = {}
    for kind in ("ours", "conv1d"):
        torch.manual_seed(1)
        model = build_model("xdeepfm", data.fields, data.num_domains)
        if kind == "conv1d":
            model.cin = Conv1dCIN(model.cin)
        steps[kind] = make_round(model, batches)
    for run_round in steps.values():  # warm-up
        run_round()
    times: dict[str, list[float]] = {kind: [] for kind in steps}
    for _ in range(args.rounds):
        for kind, run_round in steps.items():
            start = time.perf_counter()
            run_round()
            times[kind].append((time.perf_counter() - start) / len(batches) * 1e3)
    return times


def make_round(model: nn.Module, batches: list[tuple[Tensor, Tensor, Tensor]]):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

    def run_round() -> None:
        for sparse, label, domain in batches:
            optimizer.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(model(sparse, domain), label).backward()
            optimizer.step()

    return run_round


def worker(args: argparse.Namespace) -> None:
    from moe_mlora.allocator import configure_allocator

    torch.set_num_threads(args.threads)
    configure_allocator(args.worker)
    print(json.dumps(time_steps(args)))


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    require_ml100k(args.root, "cin")
    rows = []
    for allocator in ALLOCATORS:
        command = [sys.executable, "-m", "moe_mlora.bench", "cin", *argv, "--worker", allocator]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"moe_mlora.bench cin: the {allocator} worker failed:\n{done.stderr}")
        for kind, times in json.loads(done.stdout.splitlines()[-1]).items():
            median = statistics.median(times)
            rows.append((allocator, kind, median, min(times), BATCH_SIZE / median * 1e3))
    print(
        f"xDeepFM training step, batch {BATCH_SIZE}, {args.threads} threads, "
        f"{args.rounds} rounds x {args.steps} steps ({args.root})"
    )
    print("| allocator | CIN | median ms/step | fastest ms/step | samples/s (median) |")
    print("|---|---|---|---|---|")
    for allocator, kind, median, fastest, rate in rows:
        print(f"| {allocator} | {kind} | {median:.1f} | {fastest:.1f} | {rate:,.0f} |")
