"""scikit-learn's 8x8 handwritten digits as shards: the offline dataset of tests and the demo.

    python -m shards.digits --out data/digits [--seed 0]

1,797 images, 10 classes. Pixel values 0..16 are scaled x16 (capped at 255) to uint8 grayscale
and stored as 8x8 PNGs (the transform upsamples). Three disjoint stratified splits, deterministic
given the seed: "pretrain" (~30%, for pretraining the demo backbone), "train" (~50%), "test"
(~20%). Keys: f"{split}_{class:04d}_{position in load_digits():06d}".
"""
from __future__ import annotations

import argparse
import hashlib
import io
import sys

import numpy as np

from shards.writer import SampleSpec, finish_conversion, run_cli, stratified_split

RATIOS = {"pretrain": 0.3, "train": 0.5, "test": 0.2}
MAX_PER_SHARD = 100  # ~90 train images per class -> one class per shard; test shards hold 2 classes


def encode_png(source: np.ndarray, options: dict) -> tuple[str, bytes]:
    from PIL import Image
    buf = io.BytesIO()
    # uint8 (8, 8) -> a mode "L" image
    Image.fromarray(np.ascontiguousarray(source)).save(buf, format="PNG")
    return "png", buf.getvalue()


def digits_samples(seed: int = 0) -> dict[str, list[SampleSpec]]:
    """The SampleSpecs of every split (source = the uint8 (8, 8) image)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    images = np.minimum(d.images * 16, 255).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    labels = d.target.astype(int)
    parts = stratified_split(labels, RATIOS, seed)
    return {split: [SampleSpec(key=f"{split}_{labels[i]:04d}_{i:06d}", cls=int(labels[i]), source=images[i],
                               fingerprint=hashlib.sha256(images[i].tobytes()).hexdigest()[:16])
                    for i in positions]
            for split, positions in parts.items()}


def write_digits_shards(out_dir: str, seed: int = 0, *, progress: bool = False,
                        max_per_shard: int = MAX_PER_SHARD) -> str:
    """Convert load_digits() into shards under out_dir; returns the index.json path."""
    split_info = {"method": "stratified", "seed": seed, "ratios": RATIOS,
                  "source": "sklearn.datasets.load_digits"}
    created_by = {"converter": "shards.digits", "args": {"seed": seed, "max_per_shard": max_per_shard}}
    return finish_conversion(out_dir, "digits", [str(c) for c in range(10)], digits_samples(seed), encode_png,
                             {}, split_info, created_by, max_per_shard=max_per_shard, progress=progress)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (shards + index.json)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    args = ap.parse_args(argv)
    return run_cli(lambda: print(write_digits_shards(args.out, args.seed, progress=True)))


if __name__ == "__main__":
    sys.exit(main())
