import os
import sys

# Triton kernels are tested under the interpreter (no test machine has a GPU). The variable must be
# set before the first `import triton` of the session, and DeepSpeed, transformers and our kernels
# all import it, so it is set here rather than in the kernel test file alone. On a GPU machine,
# SDLORA_COMPILED_TRITON=1 leaves it unset so the kernels compile.
if os.environ.get("SDLORA_COMPILED_TRITON") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def tiny_config_dict(index: str = "unused/index.json", **over) -> dict:
    """A valid raw config with a tiny randomly initialised ViT (tests only)."""
    raw = {
        "name": "test",
        "backbone": {"source": "config", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "mlp_size": 64,
                     "patch_size": 8, "image_size": 32},
        "adapter": {"rank": 4},
        "cil": {"num_classes": 10, "init_classes": 2, "increment": 2, "num_tasks": 5},
        "data": {"index": index, "image_size": 32, "test_resize": 32, "hflip": False, "num_workers": 0},
        "optim": {"lr": 0.05, "epochs": 1, "global_batch": 16},
    }
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return raw
