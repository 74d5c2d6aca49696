"""python -m moe_mlora.bench cin: the Conv1d reference CIN and a tiny end-to-end run."""

from __future__ import annotations

import torch

from moe_mlora.bench import cin as bench_cin
from moe_mlora.models.layers import CIN


def test_conv1d_reference_computes_our_cin_from_the_same_weights() -> None:
    torch.manual_seed(0)
    ours = CIN(3, (6, 4), split_half=True)
    reference = bench_cin.Conv1dCIN(ours)
    embeddings = torch.randn(5, 3, 8)
    assert torch.allclose(reference(embeddings), ours(embeddings), atol=1e-5)


def test_bench_cin_times_both_cins_under_both_allocators(ml100k_root, capsys) -> None:
    bench_cin.main(["--root", str(ml100k_root), "--rounds", "1", "--steps", "2", "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    rows = [
        line for line in lines if line.startswith("| default |") or line.startswith("| tuned |")
    ]
    assert [row.split(" | ")[:2] for row in rows] == [
        ["| default", "ours"],
        ["| default", "conv1d"],
        ["| tuned", "ours"],
        ["| tuned", "conv1d"],
    ]
