import os
import sys

# Triton kernels are tested under the interpreter (no test machine has a GPU). The variable must be
# set before the first `import triton` of the session, and DeepSpeed, transformers and our kernels
# all import it, so it is set here rather than in the kernel test file alone. On a GPU machine,
# SDLORA_COMPILED_TRITON=1 leaves it unset so the kernels compile.
if os.environ.get("SDLORA_COMPILED_TRITON") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The package is installed editable by launch/test.sh (`pip install -e .[dev]`). The tests also run
# from a Python that lacks the install (e.g. a shared venv): the repository root goes first on this
# process's path and on PYTHONPATH for the scripts the tests start (launch/*.py, accelerate workers),
# so the code under test is this checkout's, installed or not.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


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


# ------------------------------------------------------------------ one thread count for the whole session
# The thread count changes the order of float reductions, so a run compared with a fixture built
# earlier (test_checkpoint's full_run, ...) must run under the same count. Some tests call launch/
# entry points in-process (train.main sets torch's count; run.main sets OMP_NUM_THREADS): put both
# back after every test, so no test inherits what another left.
import pytest  # noqa: E402

_THREAD_ENV = ("OMP_NUM_THREADS", "SDLORA_THREADS_SOURCE")


@pytest.fixture(autouse=True)
def _same_thread_count_for_every_test():
    import torch
    threads = torch.get_num_threads()
    env = {k: os.environ.get(k) for k in _THREAD_ENV}
    yield
    torch.set_num_threads(threads)
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _own_probe_token(monkeypatch):
    """Every test is its own launch for the node-shared probe of remote shards (sdlora_ds/data/probe.py):
    a probe result of an earlier test in this process is not reused."""
    import uuid
    monkeypatch.setenv("SDLORA_PROBE_TOKEN", f"test-{uuid.uuid4()}")
