"""python -m moe_mlora.bench dropout: each method's step under both masks, end to end."""

from __future__ import annotations

import pytest
import torch

from moe_mlora.bench import dropout as bench_dropout


def test_bench_dropout_times_every_method_under_both_masks(ml100k_root, capsys) -> None:
    bench_dropout.main(
        [f"root={ml100k_root}", "methods=base,mmoe", "rounds=2", "batches=2", "threads=1"]
    )
    out = capsys.readouterr().out
    rows = {
        line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:]
        for line in out.splitlines()
        if line.startswith("| ") and "|---" not in line
    }
    for method in ("base", "mmoe"):
        uniform, bits, ratio = (float(v.rstrip(" |")) for v in rows[method])
        assert uniform > 0 and bits > 0
        assert ratio == pytest.approx(bits / uniform, abs=0.01)
    assert {"1024x256", "1024x4x256"} <= set(rows)
    rates = out.split("dropped at p = 0.3 over 10M elements: ")[1].splitlines()[0]
    for part in rates.split(", "):
        assert float(part.split()[1]) == pytest.approx(0.3, abs=0.001)


def test_each_timer_draws_with_its_own_mask_on_its_own_copy(ml100k_root) -> None:
    from moe_mlora.models.layers import Dropout

    args = bench_dropout.parse_args([f"root={ml100k_root}", "methods=base,ple", "batches=1"])
    timers = bench_dropout.build_timers(args)
    for by_mask in timers.values():
        uniform, bits = by_mask["uniform"].model, by_mask["bits"].model
        assert uniform is not bits
        for model, mask in ((uniform, "uniform"), (bits, "bits")):
            masks = {m.mask for m in model.modules() if isinstance(m, Dropout)}
            assert masks == {mask}
        for a, b in zip(uniform.parameters(), bits.parameters(), strict=True):
            assert torch.equal(a, b)  # the same initial weights
