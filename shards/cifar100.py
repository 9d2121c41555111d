"""CIFAR-100 (python release: train, test, meta pickles) as shards.

    python -m shards.cifar100 --src cifar-100-python --out data/cifar100 [--workers 4]

Splits "train" (50,000) and "test" (10,000) as released (split_info: "pre-split", with the sha256
of each pickle). Class id = fine label; class names from meta's fine_label_names. Each image is a
32x32 RGB PNG (lossless; the transform upscales to 224). Keys: f"{split}_{label:04d}_{position in
the pickle:05d}". A missing or damaged pickle stops with one line naming it (exit code 2); the
images are arrays inside the pickles, so there is no per-image failure (and no --skip-bad).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import pickle
import sys

import numpy as np

from shards.writer import SampleSpec, finish_conversion, run_cli, sha256_file

DEFAULT_MAX_PER_SHARD = 500  # 500 train images per class -> one class per shard; test: 5 classes


def _load(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"CIFAR-100 file {path!r} is missing; --src must be the extracted 'cifar-100-python' "
                         f"folder holding train, test and meta")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:  # truncated downloads raise EOFError/UnpicklingError/...
        raise ValueError(f"CIFAR-100 file {path!r} is not a readable pickle ({type(e).__name__}: {e}); "
                         f"re-extract the archive") from None


def _get(d: dict, name: str, path: str):
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise ValueError(f"CIFAR-100 file {path!r} has no {name!r} entry; is it the python release?")


def encode_png(source: np.ndarray, options: dict) -> tuple[str, bytes]:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(source).save(buf, format="PNG")  # uint8 (32, 32, 3) -> RGB
    return "png", buf.getvalue()


def cifar_samples(src: str) -> tuple[list[str], dict[str, list[SampleSpec]], dict]:
    meta_path = os.path.join(src, "meta")
    names = [n.decode() if isinstance(n, bytes) else n for n in _get(_load(meta_path), "fine_label_names", meta_path)]
    samples, hashes = {}, {}
    for split in ("train", "test"):
        path = os.path.join(src, split)
        d = _load(path)
        data = np.asarray(_get(d, "data", path), dtype=np.uint8)
        labels = [int(v) for v in _get(d, "fine_labels", path)]
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != data.shape[0]:
            raise ValueError(f"CIFAR-100 file {path!r}: data {data.shape} / {len(labels)} labels, expected "
                             f"(N, 3072) and N labels")
        bad = sorted({v for v in labels if not 0 <= v < len(names)})
        if bad:
            raise ValueError(f"CIFAR-100 file {path!r} has labels {bad[:5]} outside 0..{len(names) - 1}")
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3), HWC for PIL
        samples[split] = [SampleSpec(f"{split}_{c:04d}_{i:05d}", c, np.ascontiguousarray(images[i]),
                                     hashlib.sha256(images[i].tobytes()).hexdigest()[:16])
                          for i, c in enumerate(labels)]
        hashes[split] = sha256_file(path)
    return names, samples, {"method": "pre-split", "source": "cifar-100-python", "pickle_sha256": hashes}


def convert_cifar100(src: str, out: str, *, workers: int = 1, max_per_shard: int = DEFAULT_MAX_PER_SHARD,
                     progress: bool = True) -> str:
    """Returns the index.json path."""
    names, samples, info = cifar_samples(src)
    created_by = {"converter": "shards.cifar100", "args": {"src": os.path.abspath(src),
                                                           "max_per_shard": max_per_shard}}
    return finish_conversion(out, "cifar100", names, samples, encode_png, {}, info, created_by,
                             max_per_shard=max_per_shard, workers=workers, progress=progress)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True, help="extracted cifar-100-python folder")
    ap.add_argument("--out", required=True, help="output folder (shards + index.json)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--max-per-shard", type=int, default=DEFAULT_MAX_PER_SHARD)
    a = ap.parse_args(argv)
    return run_cli(lambda: print(convert_cifar100(a.src, a.out, workers=a.workers, max_per_shard=a.max_per_shard)))


if __name__ == "__main__":
    sys.exit(main())
