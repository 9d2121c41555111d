"""The CPU thread policy: how many intra-op threads a process uses, and which count a resumed run
continues with. One place for both, read by the launch scripts (launch/run.py, train.py) and by
resume.py.

- `cpu_threads` / `set_cpu_threads`: intra-op threads per process = usable CPUs / processes on
  this machine (at least 1), unless OMP_NUM_THREADS says otherwise. Never the load average: the
  thread count changes the order of float reductions, so a count that followed the machine's load
  gave other numbers on a busy machine, and a resumed run continued with other rounding. torch's
  default (every core in every process) oversubscribes the CPU as soon as two processes share a
  machine.
- The count is recorded in results.json and every checkpoint, and a resume goes back to it
  (`resume_threads`) unless the user forced another (`threads_source`, THREADS_SOURCE_ENV).
"""
from __future__ import annotations

import os
from typing import Optional


# ------------------------------------------------------------------ CPU threads
def usable_cpus() -> int:
    """CPUs this process may run on: the affinity mask, capped by a cgroup v2 CPU quota (containers)
    and by the physical core count (a second hyper-thread adds little to dense math)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    try:
        import psutil
        physical = psutil.cpu_count(logical=False)
        if physical:
            n = min(n, physical)
    except ImportError:
        pass
    return max(1, n)


def cpu_threads(local_processes: int = 1, environ: Optional[dict] = None) -> tuple[int, str]:
    """(threads per process, how the number was found). OMP_NUM_THREADS wins when set to a
    positive integer; otherwise usable CPUs // processes on this machine, at least 1. It depends on
    the machine and the launch only, never on what else runs there (see the module docstring)."""
    env = os.environ if environ is None else environ
    given = env.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given), "OMP_NUM_THREADS"
    cpus, procs = usable_cpus(), max(1, local_processes)
    return max(1, cpus // procs), f"{cpus} usable CPUs / {procs} process(es)"


def set_cpu_threads(local_processes: int = 1) -> int:
    """torch.set_num_threads(cpu_threads(...)); returns the number."""
    import torch
    n, _ = cpu_threads(local_processes)
    torch.set_num_threads(n)
    return n


def local_world_size() -> int:
    """Processes of this run on this machine (the launcher's LOCAL_WORLD_SIZE; 1 without one)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


# ------------------------------------------------------------------ resuming: the recorded count
THREADS_SOURCE_ENV = "SDLORA_THREADS_SOURCE"
"""Set by launch/run.py beside OMP_NUM_THREADS: 'auto' when it chose the count itself (cpu_threads),
'user' when it was given, so that a worker can tell its own count from one a user forced."""


def threads_source(environ=None) -> str:
    """Who chose this process's thread count: 'user' (OMP_NUM_THREADS set by hand, or by plain
    `accelerate launch`, which cannot be told apart) or 'auto' (launch/run.py or launch/train.py
    from the CPU and process counts; also a Trainer built in-process without OMP_NUM_THREADS)."""
    env = os.environ if environ is None else environ
    if env.get(THREADS_SOURCE_ENV) in ("auto", "user"):
        return env[THREADS_SOURCE_ENV]
    return "user" if env.get("OMP_NUM_THREADS", "").strip() else "auto"


def resume_threads(recorded: Optional[int], current: int, source: str, same_world: bool = True) -> tuple:
    """(threads to continue with, the one line that says so). The thread count changes the order of
    float reductions, so a resume continues with the count the checkpoint was trained with, unless
    the user forced another one (then it says the run will not be bitwise), or the world size
    changed (the sums over ranks group differently anyway: this launch's own share of the CPUs)."""
    if recorded is not None and recorded != current and not same_world:
        return current, (f"threads: {current} per process (the checkpoint was trained with {recorded}, on another "
                         f"number of processes: not bitwise anyway)")
    if recorded is None:
        return current, (f"threads: {current} per process (the checkpoint records no thread count: it was written "
                         f"before counts were recorded; floats may differ from an uninterrupted run in the last "
                         f"digits)")
    if recorded == current:
        return current, f"threads: {current} per process, as recorded in the checkpoint"
    if source == "auto":
        return recorded, (f"threads: {recorded} per process, as recorded in the checkpoint (this launch would have "
                          f"used {current}), so the run continues bitwise")
    return current, (f"warning: OMP_NUM_THREADS={current} forces {current} thread(s) per process, the checkpoint was "
                     f"trained with {recorded}: the resumed run will not be bitwise identical to an uninterrupted "
                     f"one (unset OMP_NUM_THREADS, or set it to {recorded}, to continue bitwise)")
