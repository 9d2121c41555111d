"""data_shards (the training loader on the e2e shard folder) and data_bench_cuda / data_bench_cpu
(bench/data_throughput.py) parts."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

from .common import Skip, on_cuda, run_cmd, shard_index


def _epoch(loader) -> tuple:
    """(seconds, images) of one pass over a loader, wall clock."""
    t0, n = time.perf_counter(), 0
    for x, _ in loader:
        n += x.shape[0]
    return time.perf_counter() - t0, n


def part_data_shards(ctx) -> dict:
    from sdlora_ds.config import DataConfig
    from sdlora_ds.data import ShardIndex, build_loader
    s = ctx["sizes"]
    path = shard_index(ctx)
    index = ShardIndex.load(path, verify_checksums=True)
    cfg = DataConfig(index=path, image_size=s["image"], test_resize=s["image"], num_workers=s["workers"])
    kw = dict(split="train", class_ids=list(range(index.num_classes)), train=True, batch_size=s["e2e_batch"],
              rank=0, world_size=1, seed=0)
    epochs = [_epoch(build_loader(index, cfg, epoch=e, **kw)) for e in range(2)]  # epoch 0 warms up
    secs, n = epochs[1]
    return {"workers": s["workers"], "images": n, "seconds": round(secs, 3), "img_s": round(n / secs, 1),
            "img_s_per_worker": round(n / secs / max(1, s["workers"]), 1), "warmup_epoch_s": round(epochs[0][0], 3)}


def _data_bench(ctx, device: str) -> dict:
    s = ctx["sizes"]
    path = os.path.join(ctx["work"], f"data_bench_{device}.json")
    if os.path.exists(path):
        os.remove(path)
    cmd = [sys.executable, os.path.join("bench", "data_throughput.py"), "--images", str(s["bench_images"]),
           "--workers", str(s["workers"]), "--device", device, "--out-json", path,
           "--dir", os.path.join(ctx["work"], f"data_bench_{device}")]
    cmd += ["--classes", "2", "--repeats", "1", "--min-side", "64", "--max-side", "96", "--batch", "8"] \
        if ctx["smoke"] else ["--repeats", "3"]
    shutil.rmtree(os.path.join(ctx["work"], f"data_bench_{device}"), ignore_errors=True)
    os.makedirs(os.path.join(ctx["work"], f"data_bench_{device}"))
    rc, text = run_cmd(cmd, ctx["timeout"] - 5)
    if rc != 0:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        raise RuntimeError(f"bench/data_throughput.py exited {rc}: {(lines or [''])[-1][:400]}")
    if not os.path.isfile(path):
        raise RuntimeError(f"bench/data_throughput.py did not write --out-json {path}")
    with open(path) as f:
        return {"command": " ".join(cmd), "result": json.load(f)}


def part_data_bench_cuda(ctx) -> dict:
    if not on_cuda(ctx):
        raise Skip("GPU decode path: no CUDA device")
    return _data_bench(ctx, "cuda")


def part_data_bench_cpu(ctx) -> dict:
    return _data_bench(ctx, "cpu")
