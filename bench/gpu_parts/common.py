"""What the GPU check's parts share (standard library only: the orchestrator imports it too):
paths, the measured sizes, the Skip signal, running a command with a timeout."""
from __future__ import annotations

import os
import signal
import subprocess

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(BENCH)


def sizes(smoke: bool) -> dict:
    """The measured shapes (GPU) or tiny ones that exercise the same code (CPU smoke)."""
    if smoke:
        return dict(d=32, layers=2, heads=4, image=32, batch=2, tasks=[1, 20], rounds=1, rank=4, cpt=2,
                    tokens=64, op_rounds=1, classes=4, per_class=12, jpeg=64, e2e_epochs=1, e2e_batch=8,
                    workers=0, bench_images=24)
    return dict(d=768, layers=12, heads=12, image=224, batch=128, tasks=[1, 5, 20, 50], rounds=10, rank=10,
                cpt=10, tokens=128 * 197, op_rounds=20, classes=4, per_class=768, jpeg=224, e2e_epochs=2,
                e2e_batch=128, workers=max(1, min(8, (os.cpu_count() or 2) - 2)), bench_images=400)


class Skip(Exception):
    """The whole part does not apply here (reason in the message)."""


def on_cuda(ctx) -> bool:
    return ctx["device"].startswith("cuda")


def shard_index(ctx) -> str:
    path = os.path.join(ctx["work"], "shards", "index.json")
    if not os.path.isfile(path):
        raise RuntimeError(f"no shard index at {path}: the 'shards' part did not produce it")
    return path


def run_cmd(cmd: list, timeout: float, env=None) -> tuple:
    """(returncode, stdout+stderr); on timeout the whole process group is killed (accelerate's
    children too) and returncode is 124."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout))
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return 124, (out or "") + f"\n[timed out after {timeout:.0f} s]"
