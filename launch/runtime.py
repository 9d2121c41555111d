"""Process-level settings shared by the launch scripts (train.py, run.py, pretrain_demo_backbone.py).
(User errors and their exit codes: sdlora_ds/errors.py.)

- `cpu_threads` / `set_cpu_threads`: intra-op threads per process = usable CPUs / processes on
  this machine (at least 1), unless OMP_NUM_THREADS says otherwise. Never the load average: the
  thread count changes the order of float reductions, so a count that followed the machine's load
  gave other numbers on a busy machine, and a resumed run continued with other rounding. The count
  is recorded in results.json and every checkpoint, and a resume goes back to it
  (resume.resume_threads). torch's default (every core in every process) oversubscribes
  the CPU as soon as two processes share a machine.
- `deepspeed_build_note`: DeepSpeed on CPU compiles a C++ extension (its shared-memory
  communication op) the first time it starts, silently, for minutes; say so before it starts.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from sdlora_ds.errors import is_reporting_process


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


THREADS_SOURCE_ENV = "SDLORA_THREADS_SOURCE"
"""Set to 'auto' beside the OMP_NUM_THREADS that run.py chooses itself (cpu_threads), so that a worker
can tell that count from one a user forced (sdlora_ds/resume.threads_source reads it)."""


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


# ------------------------------------------------------------------ DeepSpeed's first build
def deepspeed_build_pending() -> Optional[str]:
    """The name of the DeepSpeed op this run will compile at start-up, or None.

    Only DeepSpeed on the CPU builds one: its CPU accelerator loads the shared-memory
    communication op (deepspeed_shm_comm) when the communication backend starts. It is compiled
    by torch.utils.cpp_extension into the torch extensions folder (TORCH_EXTENSIONS_DIR, default
    ~/.cache/torch_extensions/<python>_<build>/) unless it was pre-built into the DeepSpeed wheel
    (DS_BUILD_SHM_COMM=1) or an earlier run left the compiled library there."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    try:
        import torch
        if torch.cuda.is_available():
            return None
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops
        from torch.utils.cpp_extension import _get_build_directory
    except Exception:  # no DeepSpeed, or a layout this check does not know: say nothing
        return None
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None  # DeepSpeed will not load it
    if installed_ops.get(builder.NAME, False):
        return None  # pre-built into the wheel
    try:
        folder = _get_build_directory(builder.NAME, verbose=False)
    except Exception:
        return builder.NAME
    if os.path.isfile(os.path.join(folder, f"{builder.NAME}.so")):
        return None
    return builder.NAME


def deepspeed_build_note() -> None:
    """Print (reporting process only) that the first DeepSpeed CPU run compiles an op."""
    name = deepspeed_build_pending()
    if name and is_reporting_process():
        print(f"note: DeepSpeed on CPU compiles its '{name}' extension now (first run on this machine; "
              f"this can take minutes without output; later runs reuse it from the torch extensions folder, "
              f"TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions)", file=sys.stderr, flush=True)
