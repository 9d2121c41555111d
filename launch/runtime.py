"""Process-level settings shared by the launch scripts (train.py, run.py, pretrain_demo_backbone.py).
(User errors and their exit codes: sdlora_ds/errors.py.)

- the CPU thread count per process: sdlora_ds/threads.py.
- `deepspeed_build_note`: DeepSpeed on CPU compiles a C++ extension (its shared-memory
  communication op) the first time it starts, silently, for minutes; say so before it starts.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from sdlora_ds.errors import is_reporting_process


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
