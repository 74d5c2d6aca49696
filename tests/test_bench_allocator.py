"""python -m moe_mlora.bench allocator: per-batch costs under both allocators, end to end."""

from __future__ import annotations

import mmap

from moe_mlora.bench import allocator as bench_allocator


def test_bench_allocator_runs_each_pair_under_both_modes(ml100k_root, capsys) -> None:
    bench_allocator.main(
        [f"root={ml100k_root}", "method=mmoe", "split=gender", "pairs=2", "threads=1",
         "max_epochs=1"]
    )  # fmt: skip
    out = capsys.readouterr().out
    rows = [
        line.split(" | ")
        for line in out.splitlines()
        if line.startswith("| ") and "|---" not in line
    ]
    runs = [row[:2] for row in rows[1:]]
    # each pair runs both modes, the first pair tuned first and the second default first
    assert runs == [["| 1", "tuned"], ["| 1", "default"], ["| 2", "default"], ["| 2", "tuned"]]
    assert all(int(row[2]) > 0 for row in rows[1:])  # every run recorded its training batches
    assert "tuned faster in" in out and "of 2" in out


def test_the_step_recorder_counts_faults_and_time_per_batch() -> None:
    costs = bench_allocator.StepCosts()
    costs.on_train_batch_start(None, None, None, 0)
    with mmap.mmap(-1, 8 * 2**20) as fresh:  # pages no allocator has handed out before
        for offset in range(0, len(fresh), mmap.PAGESIZE):
            fresh[offset] = 1
    costs.on_train_batch_end(None, None, None, None, 0)
    assert len(costs.faults) == len(costs.milliseconds) == 1
    assert costs.faults[0] > 0 and costs.milliseconds[0] >= 0
