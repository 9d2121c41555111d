"""Data throughput: shards (+ task cache) vs a plain torchvision ImageFolder DataLoader.

    python bench/data_throughput.py [--images 600] [--classes 6] [--workers 1] [--size 500x375]

Generates JPEGs (smooth random images, ImageNet-like size, quality 90) into an ImageFolder tree,
converts the same files into shards (original bytes), then times one training epoch of
decode + SPEC train augmentation at 224 px (RandomResizedCrop bicubic + flip + ToTensor) for:
  imagefolder       torchvision.datasets.ImageFolder + DataLoader(shuffle=True) with the classic
                    PIL transforms the reference code uses (v1 RandomResizedCrop, flip, ToTensor)
  imagefolder_same  the same ImageFolder DataLoader with our build_transform (isolates the data path)
  shards            build_loader(train=True) reading the tars
  cached            build_loader with a filled TaskCache (no tar reads)
After one warm-up read of every file (all read from the page cache), the variants run one epoch
each, interleaved, --repeats times, in one process; the median epoch of each is reported. Timings
on shared machines are noisy: compare the ratios. Prints images/s per worker
and ends with one JSON line (shards_over_imagefolder, cached_over_imagefolder, and the same two
against imagefolder_same).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sdlora_ds.config import DataConfig  # noqa: E402
from sdlora_ds.data import ShardIndex, TaskCache, build_loader, build_transform  # noqa: E402
from shards.imagefolder import convert_folder  # noqa: E402


def make_jpegs(root: str, n: int, classes: int, size: tuple[int, int], seed: int = 0) -> None:
    """Smooth random photos-like images: a low-resolution random field upscaled, plus noise."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        c = i % classes
        d = os.path.join(root, "train", f"class{c:03d}")
        os.makedirs(d, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        arr = np.asarray(small).astype(np.int16) + rng.integers(-12, 12, (h, w, 3))
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(os.path.join(d, f"img_{i:05d}.jpg"), quality=90)
    for c in range(classes):  # the converter's pre-split layout needs a test folder too
        d = os.path.join(root, "test", f"class{c:03d}")
        os.makedirs(d, exist_ok=True)
        Image.new("RGB", (w, h)).save(os.path.join(d, "t.jpg"))


def time_epoch(loader) -> tuple[float, int]:
    t0, n = time.perf_counter(), 0
    for x, _ in loader:
        n += x.shape[0]
    return time.perf_counter() - t0, n


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--classes", type=int, default=6)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers per variant")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", default="500x375", help="JPEG width x height")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--repeats", type=int, default=3, help="epochs per variant (the median is reported)")
    a = ap.parse_args(argv)
    from torchvision.datasets import ImageFolder

    size = tuple(int(v) for v in a.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        work = a.dir or tmp
        src, out = os.path.join(work, "jpegs"), os.path.join(work, "shards")
        make_jpegs(src, a.images, a.classes, size)
        index_path = convert_folder(src, out, workers=1, progress=False, max_per_shard=64)
        index = ShardIndex.load(index_path, verify_checksums=True)
        cfg = DataConfig(index=index_path, num_workers=a.workers)  # SPEC defaults: 224, bicubic, flip
        classes = list(range(index.num_classes))

        from torchvision import transforms as v1
        classic = v1.Compose([v1.RandomResizedCrop(224, scale=(0.05, 1.0), ratio=(3 / 4, 4 / 3),
                                                   interpolation=v1.InterpolationMode.BICUBIC),
                              v1.RandomHorizontalFlip(), v1.ToTensor()])

        def folder_loader(transform):
            ds = ImageFolder(os.path.join(src, "train"), transform=transform)
            return torch.utils.data.DataLoader(ds, batch_size=a.batch, shuffle=True, num_workers=a.workers,
                                               persistent_workers=False)
        kw = dict(split="train", class_ids=classes, train=True, batch_size=a.batch, rank=0, world_size=1, seed=0,
                  num_workers=a.workers)
        for p in [os.path.join(dp, f) for dp, _, fs in os.walk(work) for f in fs]:  # warm the page cache
            with open(p, "rb") as f:
                f.read()
        cache = TaskCache()
        t0 = time.perf_counter()
        build_loader(index, cfg, epoch=0, cache=cache, **kw)  # fills the cache (one read of the tars)
        fill_s = time.perf_counter() - t0

        variants = {"imagefolder": lambda e: folder_loader(classic),
                    "imagefolder_same": lambda e: folder_loader(build_transform(cfg, train=True)),
                    "shards": lambda e: build_loader(index, cfg, epoch=e, **kw),
                    "cached": lambda e: build_loader(index, cfg, epoch=e, cache=cache, **kw)}
        times: dict[str, list] = {k: [] for k in variants}
        for rep in range(a.repeats):  # interleaved, so a burst of load from elsewhere hits all variants
            for k, make in variants.items():
                times[k].append(time_epoch(make(rep + 1)))
        runs = {k: sorted(v)[len(v) // 2] for k, v in times.items()}  # median epoch (time, images)

    w = max(1, a.workers)
    rate = {k: n / t / w for k, (t, n) in runs.items()}
    print(f"{a.images} JPEGs {size[0]}x{size[1]}, batch {a.batch}, {a.workers} worker(s), 224 px train transform")
    for k, v in rate.items():
        print(f"  {k:17s} {v:8.1f} images/s per worker")
    print(f"  cache fill        {fill_s:8.2f} s ({cache.nbytes / 2**20:.1f} MiB)")
    result = {"images": a.images, "size": list(size), "workers": a.workers, "batch": a.batch, "repeats": a.repeats,
              **{f"{k}_ips_per_worker": round(v, 1) for k, v in rate.items()},
              "cache_fill_s": round(fill_s, 3),
              "shards_over_imagefolder": round(rate["shards"] / rate["imagefolder"], 3),
              "cached_over_imagefolder": round(rate["cached"] / rate["imagefolder"], 3),
              "shards_over_imagefolder_same_transform": round(rate["shards"] / rate["imagefolder_same"], 3),
              "cached_over_imagefolder_same_transform": round(rate["cached"] / rate["imagefolder_same"], 3)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
