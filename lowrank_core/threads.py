"""Thread policy for torch on CPU: use the cores that are free, not every core the machine has.

torch starts one OpenMP thread per core. When other processes already keep cores busy (a test run, a
second job, the other ranks of a data-parallel launch), those threads oversubscribe the cores and every
synchronised step waits for a descheduled thread: measured 4-10x slower on 2 shared cores. The policy:

- ``LOWRANK_THREADS`` (an integer ≥ 1) wins when set;
- otherwise the cores this process may run on (``sched_getaffinity``), divided among the ``processes``
  of a launch, minus the cores other processes keep busy right now (runnable tasks), at least 1.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import torch

ENV = "LOWRANK_THREADS"


def available_cores() -> int:
    """Cores this process may be scheduled on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def busy_cores(samples: int = 5, interval: float = 0.02) -> int:
    """Cores other processes keep busy now: runnable tasks in ``/proc/loadavg`` (less this one), averaged
    over ``samples`` readings ``interval`` s apart. The 1-minute load average lags a finished job by
    minutes, so it is only the fallback where ``/proc`` is missing."""
    readings = []
    for i in range(samples):
        try:
            running = Path("/proc/loadavg").read_text().split()[3].split("/")[0]
            readings.append(max(0, int(running) - 1))
        except (OSError, IndexError, ValueError):
            break
        if i + 1 < samples:
            time.sleep(interval)
    if readings:
        return int(sum(readings) / len(readings))
    try:
        return int(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0


def thread_count(processes: int = 1, env: Optional[dict] = None, load_aware: bool = True) -> int:
    """The number of torch threads one of ``processes`` co-operating processes should use."""
    env = os.environ if env is None else env
    raw = str(env.get(ENV, "")).strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"{ENV}={raw!r} is not a thread count; allowed: an integer of at least 1")
        return value
    share = max(1, available_cores() // max(1, int(processes)))
    if load_aware:
        free = available_cores() - busy_cores()
        share = min(share, max(1, free // max(1, int(processes))))
    return share


def configure_threads(processes: int = 1, device: str = "cpu") -> int:
    """Set torch's intra-op threads by :func:`thread_count` for CPU work; returns the count (0 on a GPU)."""
    if torch.device(device).type != "cpu" and str(device) != "auto":
        return 0
    n = thread_count(processes)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
