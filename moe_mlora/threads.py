"""How many torch threads a run takes when ``threads`` is not set: the CPUs that are free.

On a machine shared with other busy processes, torch's default (one thread per core) makes a
training step collapse: every operator ends in a barrier where each OpenMP thread waits for
the others, so a step runs at the speed of the thread the scheduler serves last, and waiting
threads spin on the CPUs the others need. ``python -m moe_mlora.bench contention`` measured
the default run on 2 cores beside 4 busy processes at 7.4x its idle time with 2 threads and
2.8x with 1 (beside 4 two-thread torch processes: 18.7x and 5.1x). So a run counts the
threads that are running on the machine right now (``/proc/loadavg``, a few samples) and takes
only the CPUs they leave free, at least one. The CPUs are those the process may run on
(affinity) within its cgroup's CPU quota (containers, SLURM).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path

SAMPLES = 5
SAMPLE_INTERVAL_S = 0.02


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota if any."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    quota = _cgroup_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def _cgroup_quota() -> float | None:
    try:
        limit, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) / int(period)


def other_running_threads() -> int | None:
    """Threads of other processes running or waiting to run now (median of a few samples);
    None where the system does not say (no ``/proc``)."""
    counts = []
    for sample in range(SAMPLES):
        if sample:
            time.sleep(SAMPLE_INTERVAL_S)
        try:
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        counts.append(max(0, running - _own_running_threads()))
    return int(statistics.median(counts))


def _own_running_threads() -> int:
    """This process's threads in state R (the sampling thread is one of them)."""
    running = 0
    for stat in Path("/proc/self/task").glob("*/stat"):
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        running += state == "R"
    return max(running, 1)


def free_cpu_threads(default: int) -> tuple[int, str]:
    """``(threads, why)``: ``default`` (torch's choice) capped by the CPUs that others leave
    free, at least 1; ``why`` says what was counted, for the log."""
    cpus = available_cpus()
    others = other_running_threads()
    if others is None:
        return min(default, cpus), f"{cpus} CPUs"
    threads = max(1, min(default, cpus - others))
    return threads, f"{cpus} CPUs, {others} threads of other processes running"
