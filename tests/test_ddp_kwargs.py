"""sdlora_ds.distributed.ddp_kwargs_handler: DDP without the per-forward buffer broadcast, through
the argument the installed torch supports (no `broadcast_buffers` deprecation warning)."""
import subprocess
import sys

from conftest import ROOT

# A one-rank gloo group in a child process: the test session's own process stays without one.
CHILD = r"""
import os, tempfile, warnings
import torch, torch.distributed as dist
from sdlora_ds.distributed import ddp_kwargs_handler
dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tempfile.mkdtemp(), "s"), 1), rank=0, world_size=1)
m = torch.nn.Linear(3, 2)
m.register_buffer("frozen", torch.ones(2))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ddp = torch.nn.parallel.DistributedDataParallel(m, **ddp_kwargs_handler().to_kwargs())
print("WARNINGS", [str(w.message)[:60] for w in caught if "buffer" in str(w.message)])
print("SYNC", ddp.will_sync_module_buffers())
dist.destroy_process_group()
"""


def test_no_forward_buffer_sync_and_no_deprecation_warning():
    r = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "WARNINGS []" in r.stdout and "SYNC False" in r.stdout, r.stdout + r.stderr
