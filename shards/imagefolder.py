"""Any ImageFolder-style tree (one folder per class) as shards; the base of the ImageNet-R converter.

    python -m shards.imagefolder --src DIR --out DIR [--seed 0] [--test-fraction 0.2]
                                 [--resize-shorter 256] [--workers 8] [--max-per-shard 256]

Two layouts, detected from --src:
- pre-split: DIR/train/<class>/* and DIR/test/<class>/* -> splits "train" and "test" as given.
  Class names = the sorted union of both folders' class folders.
- single tree: DIR/<class>/* -> a seeded per-class split: in each class (sorted file names), a
  numpy default_rng([seed, class id]) permutation; the first round(test_fraction * n) go to
  "test", the rest to "train".
The index records the split (seed and fraction, or "pre-split") and a hash of the resulting file
lists (split_info.file_list_sha256), so two machines can check they train on the same split.

Images: original bytes by default (extension normalised: .jpeg -> jpg). Every image is decoded
once at conversion: a corrupt or unreadable file stops the conversion with one line naming it
(exit code 2; finished shards are kept), instead of failing training later; with --skip-bad it is
left out and listed in the index (`bad_samples`). Images must sit directly in their class folder:
a class folder holding sub-folders stops the conversion with their names (nothing is dropped
silently; move their images up or remove them). Files with other extensions (README.txt, ...)
and hidden entries are ignored. --resize-shorter N shrinks images whose shorter side exceeds N
(bicubic, antialiased); JPEG sources are re-encoded as JPEG quality 95, others as PNG.
Keys: f"{split}_{class id:04d}_{file stem}" (characters other than [A-Za-z0-9_-] become '_', a
numeric suffix keeps keys unique).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Optional

import numpy as np

from shards.writer import SampleSpec, finish_conversion, run_cli, sanitize_key

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".gif"}
DEFAULT_MAX_PER_SHARD = 256


def list_classes(folder: str) -> dict[str, list[str]]:
    """{class folder name: sorted image file names} of one ImageFolder tree."""
    if not os.path.isdir(folder):
        raise ValueError(f"image folder {folder!r} does not exist; pass the extracted dataset folder as --src")
    out, nested = {}, []
    for name in sorted(os.listdir(folder)):
        sub = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isdir(sub):
            continue  # README files, hidden folders
        entries = [f for f in os.listdir(sub) if not f.startswith(".")]
        nested += [os.path.join(name, f) for f in sorted(entries) if os.path.isdir(os.path.join(sub, f))]
        out[name] = sorted(f for f in entries if os.path.splitext(f)[1].lower() in IMAGE_EXTS
                           and not os.path.isdir(os.path.join(sub, f)))
    if nested:
        raise ValueError(f"class folder(s) under {folder!r} hold sub-folders, which are not read: {nested[:5]}"
                         f"{f' and {len(nested) - 5} more' if len(nested) > 5 else ''}; images must sit directly "
                         f"in their class folder: move them up or remove the sub-folders")
    if not out:
        raise ValueError(f"image folder {folder!r} has no class sub-folders; expected <class>/<image> files "
                         f"(or train/<class>/ and test/<class>/)")
    empty = [c for c, f in out.items() if not f]
    if empty:
        raise ValueError(f"class folder(s) {empty[:5]} under {folder!r} hold no images ({sorted(IMAGE_EXTS)}); "
                         f"remove them or restore their files")
    return out


def is_pre_split(src: str) -> bool:
    return all(os.path.isdir(os.path.join(src, s)) for s in ("train", "test"))


def _fingerprint(path: str, src: str) -> str:
    """Relative path, size, mtime: a moved dataset folder still resumes; an edited file does not."""
    st = os.stat(path)
    return f"{os.path.relpath(path, src)}|{st.st_size}|{st.st_mtime_ns}"


def _specs(src: str, folder: str, split: str, cls_id: int, files: list[str], used: set[str]) -> list[SampleSpec]:
    out = []
    for f in files:
        base = key = f"{split}_{cls_id:04d}_{sanitize_key(os.path.splitext(f)[0])}"
        n = 1
        while key in used:  # 'a.b.jpg' and 'a_b.jpg' sanitise to the same key
            key = f"{base}_{n}"
            n += 1
        used.add(key)
        path = os.path.join(folder, f)
        out.append(SampleSpec(key, cls_id, path, _fingerprint(path, src)))
    return out


def folder_samples(src: str, seed: int = 0, test_fraction: float = 0.2
                   ) -> tuple[list[str], dict[str, list[SampleSpec]], dict]:
    """(class names, SampleSpecs per split, split_info) for either layout."""
    src = os.path.abspath(src)
    used: set[str] = set()
    if is_pre_split(src):
        trees = {s: list_classes(os.path.join(src, s)) for s in ("train", "test")}
        names = sorted(set(trees["train"]) | set(trees["test"]))
        samples = {s: [sp for i, c in enumerate(names) if c in trees[s]
                       for sp in _specs(src, os.path.join(src, s, c), s, i, trees[s][c], used)]
                   for s in ("train", "test")}
        return names, samples, {"method": "pre-split", "folders": ["train", "test"]}
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test-fraction {test_fraction}: must be between 0 and 1")
    tree = list_classes(src)
    names = sorted(tree)
    samples: dict[str, list[SampleSpec]] = {"train": [], "test": []}
    for i, c in enumerate(names):
        files = tree[c]
        perm = np.random.default_rng([seed, i]).permutation(len(files))
        n_test = round(test_fraction * len(files))
        test = sorted(files[j] for j in perm[:n_test])
        train = sorted(files[j] for j in perm[n_test:])
        samples["train"] += _specs(src, os.path.join(src, c), "train", i, train, used)
        samples["test"] += _specs(src, os.path.join(src, c), "test", i, test, used)
    info = {"method": "seeded per-class split", "seed": seed, "test_fraction": test_fraction,
            "rule": "numpy default_rng([seed, class id]).permutation over sorted file names; first "
                    "round(test_fraction * n) -> test"}
    return names, samples, info


def encode_file(path: str, options: dict) -> tuple[str, bytes]:
    """Original bytes (decoded once to catch corrupt files), or resized when options ask."""
    from PIL import Image, UnidentifiedImageError
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    ext = {"jpeg": "jpg", "tif": "tiff"}.get(ext, ext)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"image {path!r} cannot be read ({e.strerror or e})") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            fmt = img.format
            n = options.get("resize_shorter")
            if not n or min(img.size) <= n:
                return ext, data
            w, h = img.size
            s = n / min(w, h)
            size = (max(1, round(w * s)), max(1, round(h * s)))
            out = io.BytesIO()
            if fmt == "JPEG":
                img = img.convert("RGB") if img.mode not in ("RGB", "L") else img
                img.resize(size, Image.BICUBIC, reducing_gap=3.0).save(out, format="JPEG", quality=95)
                return "jpg", out.getvalue()
            img.resize(size, Image.BICUBIC, reducing_gap=3.0).save(out, format="PNG")
            return "png", out.getvalue()
    except UnidentifiedImageError:
        raise ValueError(f"image {path!r} is corrupt or not an image (not a format PIL recognises)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"image {path!r} is corrupt or not an image ({e})") from None


def convert_folder(src: str, out: str, *, dataset: str = "imagefolder", seed: int = 0,
                   test_fraction: float = 0.2, resize_shorter: Optional[int] = None, workers: int = 1,
                   max_per_shard: int = DEFAULT_MAX_PER_SHARD, progress: bool = True,
                   converter: str = "shards.imagefolder", expect_classes: Optional[int] = None,
                   skip_bad: bool = False) -> str:
    """Convert an ImageFolder tree (either layout) into shards under `out`; returns index.json.
    skip_bad: leave corrupt/unreadable images out (listed in the index) instead of stopping."""
    names, samples, info = folder_samples(src, seed, test_fraction)
    if expect_classes is not None and len(names) != expect_classes:
        raise ValueError(f"{src!r} holds {len(names)} class folders, {dataset} has {expect_classes}; point "
                         f"--src at the extracted folder itself, or use shards.imagefolder for other trees")
    options = {"resize_shorter": resize_shorter}
    created_by = {"converter": converter, "args": {"src": os.path.abspath(src), "seed": seed,
                                                   "test_fraction": test_fraction, "resize_shorter": resize_shorter,
                                                   "max_per_shard": max_per_shard}}
    return finish_conversion(out, dataset, names, samples, encode_file, options, info, created_by,
                             max_per_shard=max_per_shard, workers=workers, progress=progress, skip_bad=skip_bad)


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--src", required=True, help="extracted dataset folder")
    ap.add_argument("--out", required=True, help="output folder (shards + index.json)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the per-class split (single-tree layout)")
    ap.add_argument("--test-fraction", type=float, default=0.2, help="test share per class (single tree)")
    ap.add_argument("--resize-shorter", type=int, default=None, help="shrink the shorter side to N pixels")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="processes")
    ap.add_argument("--max-per-shard", type=int, default=DEFAULT_MAX_PER_SHARD,
                    help="samples per shard; larger classes get several shards, smaller ones share")
    ap.add_argument("--skip-bad", action="store_true",
                    help="leave corrupt or unreadable images out (listed in index.json 'bad_samples' and counted "
                         "in the summary) instead of stopping on the first one")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--name", default="imagefolder", help="dataset name recorded in the index")
    a = ap.parse_args(argv)
    return run_cli(lambda: print(convert_folder(
        a.src, a.out, dataset=a.name, seed=a.seed, test_fraction=a.test_fraction, resize_shorter=a.resize_shorter,
        workers=a.workers, max_per_shard=a.max_per_shard, skip_bad=a.skip_bad)))


if __name__ == "__main__":
    sys.exit(main())
