"""Threads from the free CPUs: other processes counted, the cgroup quota, the log line."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moe_mlora import threads
from moe_mlora.config import compose
from moe_mlora.pipeline import runner


@pytest.mark.parametrize(
    ("cpus", "others", "default", "expected"),
    [(2, 0, 2, 2), (2, 1, 2, 1), (2, 6, 2, 1), (8, 3, 4, 4), (8, 5, 4, 3), (4, None, 8, 4)],
)
def test_threads_are_the_cpus_other_processes_leave_free(
    monkeypatch, cpus, others, default, expected
) -> None:
    monkeypatch.setattr(threads, "available_cpus", lambda: cpus)
    monkeypatch.setattr(threads, "other_running_threads", lambda: others)
    chosen, why = threads.free_cpu_threads(default)
    assert chosen == expected
    assert f"{cpus} CPUs" in why


def test_a_cgroup_quota_caps_the_cpus(monkeypatch) -> None:
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 1.5)
    assert threads.available_cpus() == min(2, len(threads.os.sched_getaffinity(0)))
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    assert threads.available_cpus() == len(threads.os.sched_getaffinity(0))


@pytest.mark.skipif(not Path("/proc/loadavg").exists(), reason="needs /proc (Linux)")
def test_a_busy_process_is_counted_and_our_own_threads_are_not() -> None:
    torch.randn(512, 512) @ torch.randn(512, 512)  # our OpenMP workers may still be spinning
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert threads.other_running_threads() >= 1
    finally:
        busy.kill()
        busy.wait()


def test_a_run_on_a_busy_machine_says_so_and_uses_the_free_cpus(monkeypatch, caplog) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runner, "TORCH_DEFAULT_THREADS", 2)
    monkeypatch.setattr(runner, "free_cpu_threads", lambda default: (1, "2 CPUs, 3 threads"))
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="moe_mlora"):
            runner.set_threads(compose(["progress=false"]))
        assert torch.get_num_threads() == 1
        assert "the machine is busy (2 CPUs, 3 threads)" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="moe_mlora"):
            runner.set_threads(compose(["progress=false", "threads=2"]))  # the user's choice
        assert torch.get_num_threads() == 2 and "busy" not in caplog.text
    finally:
        torch.set_num_threads(before)
