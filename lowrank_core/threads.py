"""Thread policy for torch on CPU: a fixed count per machine, so a result never depends on the machine's load.

Floating-point sums depend on how many threads split them, so the thread count is part of what a result
depends on. The policy, chosen once at CLI start, once per app server and once per rank of a launch:

- ``LOWRANK_THREADS=N`` (an integer ≥ 1): exactly N threads;
- ``LOWRANK_THREADS=auto``: load-aware, only when asked: the cores left free by other processes right now
  (runnable tasks in ``/proc/loadavg``), at least 1. Faster on a shared machine, but the same command can
  then give different last bits depending on what else runs;
- unset (the default): the cores this process may run on (``sched_getaffinity``) divided among the
  ``processes`` of a launch, at least 1: the same on every run of the same machine.

torch's count is per OS thread; threads that compute (the app's background jobs) call :func:`pin_thread`.

The count in force is recorded in every manifest and JSON record (:func:`runtime_record`); rerunning with
``LOWRANK_THREADS=<that count>`` reproduces the result bit for bit.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import torch

ENV = "LOWRANK_THREADS"
AUTO = "auto"

_policy = {"policy": "torch default", "threads": None}  # what configure_threads chose last (runtime_record)


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


def policy_of(env: Optional[dict] = None) -> str:
    """``"fixed"`` (default), ``"auto"`` (``LOWRANK_THREADS=auto``) or ``"env"`` (an explicit count);
    ``ValueError`` naming the bad value and what is allowed."""
    env = os.environ if env is None else env
    raw = str(env.get(ENV, "")).strip()
    if not raw:
        return "fixed"
    if raw.lower() == AUTO:
        return "auto"
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{ENV}={raw!r} is not a thread count; allowed: an integer of at least 1, or {AUTO!r} "
                         "(load-aware: the cores free right now)")
    return "env"


def thread_count(processes: int = 1, env: Optional[dict] = None) -> int:
    """The number of torch threads one of ``processes`` co-operating processes should use (module docstring)."""
    env = os.environ if env is None else env
    policy = policy_of(env)
    if policy == "env":
        return int(str(env[ENV]).strip())
    share = max(1, available_cores() // max(1, int(processes)))
    if policy == "auto":
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
    _policy.update(policy=policy_of(), threads=n)
    return n


def pin_thread() -> int:
    """Give the calling thread the count :func:`configure_threads` chose (no-op before it ran); returns it.

    torch keeps the count per OS thread: a new thread takes the process-wide default the first time it
    runs a parallel op, and ``decompose.solver_threads`` lowers that default for a moment on whatever thread
    runs a solver. A background job or a server thread calls this first, so its count (and so its numbers)
    does not depend on what another thread was doing when it started."""
    n = _policy["threads"]
    if n and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n or torch.get_num_threads()


def runtime_record() -> dict:
    """What a manifest records of the run's numerics: ``threads`` (torch's intra-op count now), the policy
    that chose it, and the versions of torch, transformers and Python."""
    import platform

    import transformers

    return {"threads": torch.get_num_threads(), "thread_policy": _policy["policy"],
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
