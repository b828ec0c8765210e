"""CPU threads under contention: the thread count and the OpenMP wait policy, chosen once at start-up.

torch's CPU kernels run on an OpenMP pool (libgomp in the Linux wheels; MKL and oneDNN use the same
pool). By default a pool thread that waits at a barrier spins before it sleeps, and the pool has one
thread per core. When another process shares the cores, one of our threads is descheduled, the
others spin waiting for it and take CPU time from it: a 2-core run with one other busy process was
8x slower, not 2x (issue 19, item 16).

:func:`configure_cpu` is called by the CLI before anything imports torch (OpenMP reads its variables
once, when the library loads). It looks at the cores this process may use (``os.sched_getaffinity``)
and at the tasks already runnable on the machine (``procs_running`` of ``/proc/stat``, the median of a
few samples). Where other tasks are runnable it sets, only where the user did not:

* ``OMP_WAIT_POLICY=PASSIVE``: a waiting thread sleeps instead of spinning;
* ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS``: the usable cores minus the other runnable tasks, at
  least 1.

On a quiet machine it changes nothing: torch's defaults (a spinning thread per core) are the fastest
there, and PASSIVE with several threads is not: measured with ``benchmarks/cpu_contention.py`` on the
2-core machine (make demo's recipe, 2 repeats each), a first version that always set PASSIVE took
69.7 s quiet against 31.5 s for torch's defaults, while beside one busy process 1 thread + PASSIVE took
31.1 s against 97.4 s.

A user-set ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` (torchrun sets the first) leaves the thread
count alone; a user-set ``OMP_WAIT_POLICY`` leaves the wait policy alone; ``CSTOOLKIT_CPU_TUNING=off``
leaves both (torch's defaults). Nothing is changed once torch is imported (a library caller owns its
process: use ``torch.set_num_threads`` there).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field

#: variables that fix the thread count; any one set by the user means "leave the count alone"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
WAIT_VAR = "OMP_WAIT_POLICY"
#: ``off`` (or 0, no, false) turns the tuning off
OPT_OUT_VAR = "CSTOOLKIT_CPU_TUNING"


@dataclass(frozen=True)
class CpuSettings:
    """What :func:`configure_cpu` saw and did."""

    cores: int
    """cores this process may run on"""
    others: int
    """tasks runnable on the machine besides this process when it started"""
    changed: dict[str, str] = field(default_factory=dict)
    """the environment variables it set (empty: nothing changed)"""
    note: str = ""
    """why something was left alone"""

    def describe(self) -> str:
        """One line for the log."""
        done = ", ".join(f"{k}={v}" for k, v in self.changed.items()) or "nothing set"
        note = f" ({self.note})" if self.note else ""
        return f"cpu: {self.cores} usable cores, {self.others} other runnable tasks: {done}{note}"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def _procs_running(stat: str = "/proc/stat") -> int | None:
    try:
        with open(stat, encoding="ascii") as f:
            for line in f:
                if line.startswith("procs_running "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def other_runnable_tasks(samples: int = 5, interval: float = 0.005, stat: str = "/proc/stat") -> int:
    """Runnable tasks on the machine besides the caller: the median of ``samples`` readings of
    ``procs_running`` (which counts the caller), so a task that runs for an instant is not counted.
    0 where ``/proc/stat`` cannot be read."""
    readings = []
    for i in range(samples):
        value = _procs_running(stat)
        if value is None:
            return 0
        readings.append(value)
        if i + 1 < samples:
            time.sleep(interval)
    return max(0, round(statistics.median(readings)) - 1)


def choose_threads(cores: int, others: int) -> int:
    """Threads for the compute pool: the cores the other runnable tasks leave free, at least 1."""
    return max(1, min(cores, cores - others))


def _opted_out(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("0", "off", "no", "false")


def configure_cpu(environ: MutableMapping[str, str] | None = None, *, others: int | None = None,
                  cores: int | None = None) -> CpuSettings:
    """Set the OpenMP wait policy and thread count in ``environ`` (default ``os.environ``) before torch
    loads; see the module docstring. ``others`` and ``cores`` override what is measured (tests)."""
    env = os.environ if environ is None else environ
    cores = usable_cores() if cores is None else cores
    if _opted_out(env.get(OPT_OUT_VAR)):
        return CpuSettings(cores, 0, note=f"{OPT_OUT_VAR}={env[OPT_OUT_VAR]}")
    if "torch" in sys.modules:
        return CpuSettings(cores, 0, note="torch already imported")
    others = other_runnable_tasks() if others is None else others
    if others == 0:  # a quiet machine: torch's defaults are the fastest (module docstring)
        return CpuSettings(cores, 0, note="no other runnable task: torch's defaults")
    changed: dict[str, str] = {}
    notes = []
    if WAIT_VAR in env:
        notes.append(f"{WAIT_VAR}={env[WAIT_VAR]} kept")
    else:
        changed[WAIT_VAR] = "PASSIVE"
    user_threads = [k for k in THREAD_VARS if k in env]
    if user_threads:
        notes.append(", ".join(f"{k}={env[k]}" for k in user_threads) + " kept")
    else:
        threads = str(choose_threads(cores, others))
        changed.update({k: threads for k in THREAD_VARS})
    env.update(changed)
    return CpuSettings(cores, others, changed, "; ".join(notes))
