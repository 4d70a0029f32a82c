"""How many CPU threads a run's matrix products use: the CPUs that are idle when it starts.

Measured with ``benchmarks/threads.py`` on a 2-core machine (tiny preset, 2,048
tokens a step): with both cores idle, 2 threads train 1.6-1.7x faster than 1;
with one other CPU-bound process running, 2 threads train 3.5-4.5x *slower*
than 1, because every parallel op waits at its barrier for the thread that the
scheduler has parked behind the other process. PyTorch's default (one thread
per core) is the worst choice on a shared machine, and one thread the worst on
an idle one, so ``threads=0`` ("auto") counts the CPUs that are idle over a
short sample and uses that many (at least one).

An explicit ``OMP_NUM_THREADS`` (torchrun sets it to 1 per process) is the
user's choice and is kept. The count is chosen once, at start: changing it
mid-run could change a matrix product's summation order and so the bits of a
run that must resume exactly.
"""

from __future__ import annotations

import logging
import math
import os
import time

import torch

logger = logging.getLogger(__name__)

IDLE_MARGIN = 0.2  # a CPU counts as free when at least 80% of it was idle during the sample


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (containers)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def _cpu_times() -> dict[str, tuple[int, int]] | None:
    """Per-CPU (idle, total) jiffies from /proc/stat; None where there is no procfs."""
    try:
        lines = open("/proc/stat").read().splitlines()
    except OSError:
        return None
    times = {}
    for line in lines:
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            counts = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
            times[name] = (counts[3] + counts[4], sum(counts))
    return times


def idle_cpus(sample_s: float = 0.25) -> float | None:
    """How many of this process's CPUs were idle over ``sample_s`` seconds (fractions summed); None if unknown."""
    before = _cpu_times()
    if not before:
        return None
    time.sleep(sample_s)
    after = _cpu_times() or {}
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    idle = 0.0
    for name, (idle0, total0) in before.items():
        if allowed is not None and int(name[3:]) not in allowed:
            continue
        idle1, total1 = after.get(name, (idle0, total0))
        if total1 > total0:
            idle += (idle1 - idle0) / (total1 - total0)
    return idle


def choose_threads(requested: int = 0) -> tuple[int, str]:
    """The thread count for a run and why: ``requested`` > 0 as given, else OMP_NUM_THREADS, else the idle CPUs."""
    if requested > 0:
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cpus = usable_cpus()
    idle = idle_cpus()
    if idle is None:
        return cpus, f"{cpus} CPUs (idle time unknown)"
    return max(1, min(cpus, int(idle + IDLE_MARGIN))), f"{idle:.1f} of {cpus} CPUs idle"


def apply_threads(requested: int = 0) -> int:
    """Set torch's intra-op thread count by ``choose_threads`` and log the choice; returns the count."""
    threads, why = choose_threads(requested)
    torch.set_num_threads(threads)
    logger.info("using %d CPU thread%s (%s; --threads N to choose)", threads, "" if threads == 1 else "s", why)
    return threads
