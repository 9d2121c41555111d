"""ImageNet-A (200 classes, 7,500 natural adversarial images) as shards.

    python -m shards.imagenet_a --src imagenet-a --out data/imagenet-a [--workers 8] [--resize-shorter 256]

--src is, as for ImageNet-R (shards.imagenet_r: the same shards.imagefolder conversion), either the
commonly used pre-split copy with train/<wnid>/ and test/<wnid>/ folders (used as given; the authors' logs
show 1,519 test images) or the official archive of 200 WordNet-id folders (a seeded per-class
80/20 split, recorded in the index). Class id = position of the WordNet id in sorted order.

ImageNet-A's classes are very uneven (a few hold only a handful of images), so a class may have
very few test images, or none in the pre-split copy (its folder absent from test/). Such classes
are kept and reported: on stderr and in the index (split_info.class_report: classes without
images and with fewer than --few images per split, and the test count against 1,519). An empty
class folder is an error (remove it if the class really has no images in that split).
"""
from __future__ import annotations

import argparse
import sys

from shards.imagefolder import DEFAULT_MAX_PER_SHARD, add_common_args, convert_folder
from shards.listed import FEW_IMAGES, report_classes
from shards.writer import run_cli

NUM_CLASSES = 200
REFERENCE_TEST_IMAGES = 1519  # the authors' logs (pre-split copy)


def convert_imagenet_a(src: str, out: str, *, seed: int = 0, test_fraction: float = 0.2, resize_shorter=None,
                       workers: int = 1, max_per_shard: int = DEFAULT_MAX_PER_SHARD, progress: bool = True,
                       num_classes: int = NUM_CLASSES, few: int = FEW_IMAGES, skip_bad: bool = False) -> str:
    """Returns the index.json path. num_classes: the class folders expected (200; tests use fewer).
    skip_bad: leave corrupt/unreadable images out (listed in the index) instead of stopping."""
    # the ImageNet-R conversion (shards.imagenet_r is this call with dataset "imagenet-r")
    path = convert_folder(src, out, dataset="imagenet-a", seed=seed, test_fraction=test_fraction,
                          resize_shorter=resize_shorter, workers=workers, max_per_shard=max_per_shard,
                          progress=progress, converter="shards.imagenet_a", expect_classes=num_classes,
                          skip_bad=skip_bad)
    reference = {"test": REFERENCE_TEST_IMAGES} if num_classes == NUM_CLASSES else None
    report_classes(path, few=few, reference=reference)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--num-classes", type=int, default=NUM_CLASSES, help="class folders expected (200)")
    ap.add_argument("--few", type=int, default=FEW_IMAGES, help="report classes with fewer images than this")
    a = ap.parse_args(argv)
    return run_cli(lambda: print(convert_imagenet_a(
        a.src, a.out, seed=a.seed, test_fraction=a.test_fraction, resize_shorter=a.resize_shorter, workers=a.workers,
        max_per_shard=a.max_per_shard, num_classes=a.num_classes, few=a.few, skip_bad=a.skip_bad)))


if __name__ == "__main__":
    sys.exit(main())
