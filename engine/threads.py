"""CPU thread defaults for headless runs, without importing torch (the CLI applies them before
torch loads, so OpenMP's default reaches every thread, the augmentation workers' included).

On a loaded machine a thread that waits for a descheduled peer at every operation costs far
more than it gives: the demo took 203 s with 2 threads and 33 s with 1 on 2 CPUs at load 8.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def available_cpus() -> int:
    """CPUs this process may really use: its affinity mask and, in a container, the cgroup CPU
    quota (docker --cpus), which os.cpu_count() and torch's default both ignore."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with contextlib.suppress(OSError, ValueError, IndexError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, -(-int(quota) // int(period))))
    return max(1, n)


def idle_cpus() -> int:
    """The usable CPUs that other processes leave free (by the 1-minute load average), at least 1."""
    n = available_cpus()
    with contextlib.suppress(OSError, AttributeError):
        n = min(n, max(1, int(n - os.getloadavg()[0] + 0.5)))
    return n


def user_chose_threads() -> bool:
    return any(os.environ.get(v) for v in THREAD_VARIABLES)


def set_thread_environment() -> int:
    """Before torch is imported: OMP/MKL threads = idle_cpus() unless the user set them, and no
    tokenizers thread pool. Returns the thread count now in force."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not user_chose_threads():
        n = str(idle_cpus())
        for v in THREAD_VARIABLES:
            os.environ[v] = n
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() else idle_cpus()
