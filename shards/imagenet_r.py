"""ImageNet-R (200 classes, ~30,000 images) as shards.

    python -m shards.imagenet_r --src imagenet-r --out data/imagenet_r [--seed 0] [--test-fraction 0.2]
                                [--resize-shorter 256] [--workers 8]

--src is either the official extracted archive (200 folders named by WordNet id, e.g. n01443537;
a seeded per-class 80/20 train/test split is made and recorded in the index) or a pre-split copy
with train/<wnid>/ and test/<wnid>/ folders (used as given; the authors' runs used such a copy,
with 24,000 train and 6,000 test images). Class id = position of the WordNet id in sorted order.
Everything else (keys, resize, resume, checksums, bad files and --skip-bad, nested folders) is
shards.imagefolder's.
"""
from __future__ import annotations

import argparse
import sys

from shards.imagefolder import DEFAULT_MAX_PER_SHARD, add_common_args, convert_folder
from shards.writer import run_cli

NUM_CLASSES = 200


def convert_imagenet_r(src: str, out: str, *, seed: int = 0, test_fraction: float = 0.2, resize_shorter=None,
                       workers: int = 1, max_per_shard: int = DEFAULT_MAX_PER_SHARD, progress: bool = True,
                       num_classes: int = NUM_CLASSES, skip_bad: bool = False) -> str:
    """Returns the index.json path. num_classes: the class folders expected (200; tests use fewer).
    skip_bad: leave corrupt/unreadable images out (listed in the index) instead of stopping."""
    return convert_folder(src, out, dataset="imagenet-r", seed=seed, test_fraction=test_fraction,
                          resize_shorter=resize_shorter, workers=workers, max_per_shard=max_per_shard,
                          progress=progress, converter="shards.imagenet_r", expect_classes=num_classes,
                          skip_bad=skip_bad)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--num-classes", type=int, default=NUM_CLASSES, help="class folders expected (200)")
    a = ap.parse_args(argv)
    return run_cli(lambda: print(convert_imagenet_r(
        a.src, a.out, seed=a.seed, test_fraction=a.test_fraction, resize_shorter=a.resize_shorter, workers=a.workers,
        max_per_shard=a.max_per_shard, num_classes=a.num_classes, skip_bad=a.skip_bad)))


if __name__ == "__main__":
    sys.exit(main())
