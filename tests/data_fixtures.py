"""Generated shard sets for the data tests (not a test module itself).

`write_id_shards` writes a dataset whose every image encodes its own sample id in its pixels, so
tests can tell exactly which samples a loader yielded: a 16x16 grayscale PNG whose left half is
id // 256 and right half id % 256. With nearest interpolation and image_size 16 the transforms keep
those values (train: scale=ratio=(1, 1) makes RandomResizedCrop the identity on a square image).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from sdlora_ds.config import DataConfig
from shards.writer import atomic_write_bytes, build_index


def id_png(sample_id: int) -> bytes:
    a = np.zeros((16, 16), np.uint8)
    a[:, :8] = sample_id // 256
    a[:, 8:] = sample_id % 256
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def decode_ids(images: torch.Tensor) -> list[int]:
    """(B, 3, 16, 16) from the loader -> sample ids."""
    hi = (images[:, 0, 0, 0] * 255).round().long()
    lo = (images[:, 0, 0, -1] * 255).round().long()
    return (hi * 256 + lo).tolist()


def epoch_batches(index, cfg, split, train, world=2, workers=0, classes=(0, 1, 2, 3), **kw) -> list:
    """Every rank's batches of one epoch (seed 4, epoch 1, batch 3), as (sample ids, labels) lists."""
    from sdlora_ds.data import build_loader
    out = []
    for r in range(world):
        loader = build_loader(index, cfg, split=split, class_ids=list(classes), train=train, batch_size=3, rank=r,
                              world_size=world, seed=4, epoch=1, num_workers=workers, **kw)
        batches = [(decode_ids(x), y.tolist()) for x, y in loader]
        assert len(batches) == len(loader)
        out.append(batches)
    return out


def id_cfg(**over) -> DataConfig:
    base = dict(index="x", image_size=16, test_resize=16, interpolation="nearest", train_scale=[1.0, 1.0],
                train_ratio=[1.0, 1.0], hflip=False, num_workers=0, shuffle_buffer=50)
    base.update(over)
    return DataConfig(**base)


def write_id_shards(root: str, layout: dict[str, Sequence[Sequence[tuple[int, int]]]], num_classes: int,
                    tamper: Optional[dict] = None) -> tuple[str, dict]:
    """layout: split -> list of shards -> list of (class id, how many samples).
    Returns (index path, {split: {sample id: class id}}). Sample ids are unique over all splits.

    tamper: {(split, shard no): fn(rows) -> rows} edits a shard's (key, cls, ext, bytes) rows after
    the index counts were taken (to make corrupt shards); cls may be None (no .cls member)."""
    os.makedirs(root, exist_ok=True)
    next_id = 0
    truth: dict[str, dict[int, int]] = {}
    entries: dict[str, list] = {}
    for split, shards in layout.items():
        truth[split], entries[split] = {}, []
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for si, spec in enumerate(shards):
            rows, per_class = [], {}
            for cls, n in spec:
                for _ in range(n):
                    rows.append((f"{split}_{cls:04d}_{next_id:06d}", cls, "png", id_png(next_id)))
                    truth[split][next_id] = cls
                    per_class[cls] = per_class.get(cls, 0) + 1
                    next_id += 1
            if tamper and (split, si) in tamper:
                rows = tamper[(split, si)](rows)
            data = _tar(rows)
            rel = f"{split}/{split}-{si:06d}.tar"
            atomic_write_bytes(os.path.join(root, rel), data)
            entries[split].append({"path": rel, "num_samples": sum(per_class.values()),
                                   "classes": sorted(per_class),
                                   "per_class": {str(c): k for c, k in sorted(per_class.items())},
                                   "sha256": hashlib.sha256(data).hexdigest()})
    index = build_index("ids", [f"c{i}" for i in range(num_classes)], entries, {"method": "generated"},
                        {"converter": "tests"})
    path = os.path.join(root, "index.json")
    with open(path, "w") as f:
        json.dump(index, f)
    return path, truth


def _tar(rows) -> bytes:
    """Like shards.writer.tar_bytes, but a row with cls None gets no .cls member."""
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key, cls, ext, data in rows:
            for name, payload in ((f"{key}.cls", None if cls is None else str(cls).encode()),
                                  (f"{key}.{ext}", data)):
                if payload is None:
                    continue
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


__all__ = ["id_png", "decode_ids", "id_cfg", "write_id_shards"]
