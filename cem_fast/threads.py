"""CPU threads that fit the machine: as many as this process may really use, fewer while other processes keep CPUs
busy.

torch starts one thread per physical core of the host, whatever the process may use: a container with a CPU
quota, or a task pinned to a few CPUs, then runs more threads than it has CPUs. And on a machine with another
CPU-bound process, every parallel region of a forward waits for its slowest thread, which shares a CPU with that
process: a run is then many times slower than with one thread fewer (the busy-machine benchmark measures it). So
during a run the thread count is

    min(torch's own count or the user's, the CPUs this process may use) - the other processes running now,

at least 1, re-read every :data:`RECHECK_S` seconds between batches; the caller's setting is restored afterwards.
``CEM_FAST_THREADS`` sets a fixed count (``auto``, the default, is the rule above); an explicit
``OMP_NUM_THREADS`` is the upper bound. Linux-only facts (affinity, cgroup quota, run queue) are read where they
exist; elsewhere the rule reduces to torch's count.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

RECHECK_S = 0.5  # how often a run re-reads how busy the machine is (between batches)


def _cgroup_quota() -> Optional[float]:
    """CPUs allowed by the cgroup's CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None without a quota."""
    for path, split in (("/sys/fs/cgroup/cpu.max", True), ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", False)):
        try:
            with open(path) as f:
                text = f.read().split()
            if split:
                quota, period = text[0], text[1]
            else:
                with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
                    quota, period = text[0], f.read().split()[0]
            if quota in ("max", "-1"):
                return None
            return int(quota) / int(period)
        except (OSError, ValueError, IndexError):
            continue
    return None


@dataclass(frozen=True)
class CpuBudget:
    """What this process may use: ``usable`` CPUs (affinity and cgroup quota), ``ceiling`` threads (torch's own
    count, ``OMP_NUM_THREADS`` or ``CEM_FAST_THREADS``) and why."""

    usable: int
    ceiling: int
    fixed: bool  # CEM_FAST_THREADS gave a number: no adjustment to the load
    why: str


def cpu_budget() -> CpuBudget:
    cpus = os.cpu_count() or 1
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = cpus
    quota = _cgroup_quota()
    usable = max(1, min(affinity, math.ceil(quota) if quota else affinity))
    why = [f"{affinity} CPUs in this process's affinity"] + ([f"cgroup quota {quota:g} CPUs"] if quota else [])
    asked = os.environ.get("CEM_FAST_THREADS", "auto").strip().lower()
    if asked not in ("", "auto"):
        try:
            n = int(asked)
            if n < 1:
                raise ValueError
        except ValueError:
            raise ValueError(f"CEM_FAST_THREADS must be 'auto' or a positive integer, got {asked!r}") from None
        return CpuBudget(usable, n, True, f"CEM_FAST_THREADS={n}")
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    ceiling = int(omp) if omp.isdigit() and int(omp) > 0 else torch.get_num_threads()
    why.append(f"OMP_NUM_THREADS={omp}" if omp.isdigit() else f"torch's {torch.get_num_threads()} threads")
    return CpuBudget(usable, max(1, min(ceiling, usable)), False, ", ".join(why))


def _running_here() -> int:
    """Threads of this process on a CPU or waiting for one (state R)."""
    n = 0
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat") as f:
                n += f.read().rsplit(")", 1)[-1].split()[0] == "R"
    except OSError:
        return 1
    return max(1, n)


def busy_elsewhere() -> int:
    """Threads of other processes running or waiting for a CPU now (the kernel's run queue less ours); 0 where
    the system does not say."""
    try:
        with open("/proc/stat") as f:
            running = next(int(line.split()[1]) for line in f if line.startswith("procs_running"))
    except (OSError, StopIteration, ValueError):
        return 0
    return max(0, running - _running_here())


def threads_now(budget: CpuBudget) -> int:
    """The threads a run should use now."""
    if budget.fixed:
        return budget.ceiling
    return max(1, min(budget.ceiling, budget.usable - busy_elsewhere()))


class ThreadGovernor:
    """Sets torch's CPU threads for a run and keeps them fitted to the load (:meth:`recheck` between batches)."""

    def __init__(self, device: torch.device):
        self.active = device.type == "cpu"
        self.budget = cpu_budget() if self.active else None
        self.saved = torch.get_num_threads()
        self.used: list[int] = []  # every count set, in order
        self._last = 0.0
        if self.active:
            self._set(threads_now(self.budget))

    def _set(self, n: int) -> None:
        if not self.used or self.used[-1] != n:
            torch.set_num_threads(n)
            self.used.append(n)
        self._last = time.monotonic()

    def recheck(self) -> None:
        if self.active and not self.budget.fixed and time.monotonic() - self._last >= RECHECK_S:
            self._set(threads_now(self.budget))

    def restore(self) -> None:
        if self.active and torch.get_num_threads() != self.saved:
            torch.set_num_threads(self.saved)

    def summary(self) -> Optional[dict]:
        """summary.json: ``cpu_threads``."""
        if not self.active:
            return None
        return {"used": self.used, "usable_cpus": self.budget.usable, "ceiling": self.budget.ceiling,
                "why": self.budget.why}


_ACTIVE: Optional[ThreadGovernor] = None  # the governor of the run in progress (a run's per-ROI runs share it)


@contextlib.contextmanager
def fitted_threads(device: torch.device) -> Iterator[ThreadGovernor]:
    """Torch's CPU threads fitted to the machine for the duration of a run (module docstring), restored after. A
    run inside a run (one run per ROI) keeps the outer run's governor: its own would take the count the outer one
    lowered for the load as the caller's, and could never raise it again."""
    global _ACTIVE
    if _ACTIVE is not None and _ACTIVE.active == (device.type == "cpu"):
        yield _ACTIVE
        return
    governor, outer = ThreadGovernor(device), _ACTIVE
    _ACTIVE = governor
    try:
        yield governor
    finally:
        _ACTIVE = outer
        governor.restore()


def describe() -> str:
    """One line for ``cem-fast info``: the threads a run would use now and why."""
    b = cpu_budget()
    others = busy_elsewhere()
    return (f"a run would use {threads_now(b)} now (at most {b.ceiling}; {b.usable} usable CPUs: {b.why}; "
            f"{others} other runnable thread{'s' if others != 1 else ''}{'' if b.fixed else ', re-read during runs'})")
