"""Animal-MNIST (PyPI `animal-mnist` 0.4, MIT) as shards: 10,000 28x28 grayscale animal silhouettes.

    python -m shards.animal_mnist --out data/animal_mnist [--test-fraction 0.2] [--seed 0]
                                  [--per-class-train N --per-class-test M] [--src DIR]

Reads the two gzip'd pickles the package installs under animal_mnist/data/Animal_MNIST/:
animal_data_version_3.gz (uint8 (10000, 28, 28), white shape on black) and
animal_label_version_3.gz (int64 (10000,), 0..9, 1,000 per class, stored class by class). The
package is located with importlib's find_spec and never imported (its loader imports tensorflow);
--src may point at an Animal_MNIST folder instead.

Class names: the package's description lists "Bear, Bird, Cat, Cow, Dog, Elephant, Giraffe, Horse,
Sheep, Zebra"; its loader (dataset_Loader.py) returns the raw labels without names. Label i is the
i-th of that (alphabetical) list: checked by eye on a montage of every class (label 6 = long necks,
9 = striped bodies, 5 = trunks).

There is no official split: a seeded stratified one is made (writer.stratified_split: per class,
numpy default_rng([seed, class]) permutes the class's positions; the first round((1 -
test_fraction) * 1000) go to "train", the rest to "test"), recorded in the index with the seed,
the ratios, the source files' sha256 and the hash of the resulting key lists. --per-class-train /
--per-class-test then keep a seeded per-class subset of each split, for fast runs.
Keys: f"{split}_{class:04d}_{position in the pickle:05d}".
"""
from __future__ import annotations

import argparse
import sys
import os
from typing import Optional

from shards.arrays import (DEFAULT_MAX_PER_SHARD, add_common_args, check_arrays, convert_arrays, file_hashes,
                           package_dir, read_gzip_pickle, require_files, run_cli)
from shards.writer import stratified_split

CLASS_NAMES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
FILES = ("animal_data_version_3.gz", "animal_label_version_3.gz")
INSTALL = "pip install --no-deps animal-mnist==0.4"


def source_dir(src: Optional[str] = None) -> str:
    """The Animal_MNIST folder: --src, or the installed package's data/Animal_MNIST."""
    if src is None:
        src = os.path.join(package_dir("animal_mnist", INSTALL), "data", "Animal_MNIST")
    require_files(src, FILES, INSTALL)
    return src


def load_animal_mnist(src: Optional[str] = None, seed: int = 0, test_fraction: float = 0.2):
    """(parts, split_info, folder): parts = split -> (images, labels, positions), the seeded split."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test-fraction {test_fraction}: must be between 0 and 1")
    folder = source_dir(src)
    data_path, label_path = (os.path.join(folder, f) for f in FILES)
    images, labels = check_arrays(read_gzip_pickle(data_path), read_gzip_pickle(label_path), len(CLASS_NAMES),
                                  f"Animal-MNIST pickles in {folder}")
    ratios = {"train": round(1.0 - test_fraction, 6), "test": test_fraction}
    parts = stratified_split(labels, ratios, seed)
    info = {"method": "stratified", "seed": seed, "ratios": ratios,
            "rule": "writer.stratified_split: per class, numpy default_rng([seed, class]) permutes the "
                    "class's positions; the first round(ratio * n) -> train, the rest -> test",
            "source": "PyPI animal-mnist 0.4 (animal_mnist/data/Animal_MNIST)", "source_sha256": file_hashes(
                [data_path, label_path])}
    return {sp: (images, labels, pos) for sp, pos in parts.items()}, info, folder


def convert_animal_mnist(out: str, *, src: Optional[str] = None, seed: int = 0, test_fraction: float = 0.2,
                         per_class_train: Optional[int] = None, per_class_test: Optional[int] = None,
                         max_per_shard: int = DEFAULT_MAX_PER_SHARD, workers: int = 1,
                         progress: bool = True) -> str:
    """Returns the index.json path."""
    parts, info, folder = load_animal_mnist(src, seed, test_fraction)
    created_by = {"converter": "shards.animal_mnist",
                  "args": {"src": os.path.abspath(folder), "seed": seed, "test_fraction": test_fraction,
                           "per_class_train": per_class_train, "per_class_test": per_class_test,
                           "max_per_shard": max_per_shard}}
    return convert_arrays(out, dataset="animal_mnist", class_names=CLASS_NAMES, parts=parts, split_info=info,
                          created_by=created_by, per_class={"train": per_class_train, "test": per_class_test},
                          subset_seed=seed, max_per_shard=max_per_shard, workers=workers, progress=progress)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, "the Animal_MNIST folder holding the two .gz pickles (default: the installed package's)")
    ap.add_argument("--test-fraction", type=float, default=0.2, help="test share per class (0.2: 800/200)")
    a = ap.parse_args(argv)
    return run_cli(lambda: print(convert_animal_mnist(a.out, src=a.src, seed=a.seed, test_fraction=a.test_fraction,
                                                      per_class_train=a.per_class_train, per_class_test=a.per_class_test,
                                                      max_per_shard=a.max_per_shard, workers=a.workers)))


if __name__ == "__main__":
    sys.exit(main())
