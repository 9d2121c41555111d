"""Fashion-MNIST (Zalando, MIT; Debian package `dataset-fashion-mnist`) as shards.

    python -m shards.fashion_mnist --out data/fashion_mnist [--per-class-train N --per-class-test M]
                                   [--seed 0] [--src /usr/share/datasets/fashion-mnist]

Reads the four IDX files the Debian package installs under /usr/share/datasets/fashion-mnist/
(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz,
t10k-labels-idx1-ubyte.gz; --src: any folder holding the same four files, e.g. the official
download). The official split as released: "train" 60,000 (6,000 per class), "test" 10,000
(1,000 per class); split_info records "pre-split" and every file's sha256. Class names: the
dataset README's label table. Images are uint8 28x28 grayscale, stored as PNG. --per-class-train /
--per-class-test keep a seeded per-class subset of each split (seed: --seed), for fast runs.
Keys: f"{split}_{class:04d}_{position in the IDX file:05d}".
"""
from __future__ import annotations

import argparse
import sys
import os
from typing import Optional

from shards.arrays import (DEFAULT_MAX_PER_SHARD, add_common_args, check_arrays, convert_arrays, file_hashes,
                           read_idx, require_files, run_cli)

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]
DEFAULT_SRC = "/usr/share/datasets/fashion-mnist"
INSTALL = "apt-get install dataset-fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def load_fashion_mnist(src: str = DEFAULT_SRC):
    """(parts, split_info): parts = split -> (images, labels, positions), the official split."""
    paths = require_files(src, [n for pair in FILES.values() for n in pair], INSTALL)
    parts = {}
    for split, (img_name, lab_name) in FILES.items():
        images, labels = check_arrays(read_idx(os.path.join(src, img_name)), read_idx(os.path.join(src, lab_name)),
                                      len(CLASS_NAMES), f"Fashion-MNIST {split} files in {src}")
        parts[split] = (images, labels, range(len(labels)))
    info = {"method": "pre-split", "source": f"Fashion-MNIST IDX files ({INSTALL})",
            "source_sha256": file_hashes(paths)}
    return parts, info


def convert_fashion_mnist(out: str, *, src: str = DEFAULT_SRC, seed: int = 0,
                          per_class_train: Optional[int] = None, per_class_test: Optional[int] = None,
                          max_per_shard: int = DEFAULT_MAX_PER_SHARD, workers: int = 1,
                          progress: bool = True) -> str:
    """Returns the index.json path."""
    parts, info = load_fashion_mnist(src)
    created_by = {"converter": "shards.fashion_mnist",
                  "args": {"src": os.path.abspath(src), "seed": seed, "per_class_train": per_class_train,
                           "per_class_test": per_class_test, "max_per_shard": max_per_shard}}
    return convert_arrays(out, dataset="fashion_mnist", class_names=CLASS_NAMES, parts=parts, split_info=info,
                          created_by=created_by, per_class={"train": per_class_train, "test": per_class_test},
                          subset_seed=seed, max_per_shard=max_per_shard, workers=workers, progress=progress)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, f"folder holding the four IDX .gz files (default: {DEFAULT_SRC})")
    a = ap.parse_args(argv)
    return run_cli(lambda: print(convert_fashion_mnist(a.out, src=a.src or DEFAULT_SRC, seed=a.seed,
                                                       per_class_train=a.per_class_train, per_class_test=a.per_class_test,
                                                       max_per_shard=a.max_per_shard, workers=a.workers)))


if __name__ == "__main__":
    sys.exit(main())
