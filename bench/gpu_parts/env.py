"""env part: versions, the device, the packages the other parts import."""
from __future__ import annotations

import importlib
import os
import sys


def part_env(ctx) -> dict:
    import torch
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
            "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
            "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
    for mod in ("triton", "transformers", "accelerate", "torchvision", "deepspeed", "webdataset"):
        try:
            info[mod] = importlib.import_module(mod).__version__
        except Exception as exc:  # noqa: BLE001 - recorded, the parts that need it fail on their own
            info[mod] = f"unavailable ({type(exc).__name__}: {exc})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                    device_count=torch.cuda.device_count())
    else:
        info["device"] = "CPU"
        if not ctx["smoke"]:
            raise RuntimeError("no CUDA device: torch.cuda.is_available() is False (torch "
                               f"{torch.__version__}, built for CUDA {torch.version.cuda}); "
                               "use --cpu-smoke for the CPU plumbing check")
    return info
