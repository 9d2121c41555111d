"""Datasets that ship as in-memory uint8 arrays (IDX files, pickles) inside installed packages.

Shared by shards.animal_mnist, shards.fashion_mnist and shards.mnist:

- locating the files: `package_dir` finds an installed package's folder with importlib's
  find_spec, which does NOT execute the package (animal-mnist's loader imports tensorflow);
  a missing package or file raises `SourceMissing`, whose message names the install command.
- readers: `read_idx` (the IDX format of MNIST/Fashion-MNIST, gzip'd or not) and
  `read_gzip_pickle`.
- the common flow: `check_arrays` (shape, dtype, label range), an optional seeded per-class
  subset (`per_class_subset`, for fast runs), SampleSpecs keyed by the position in the source
  array (`array_specs`), and `convert_arrays`, which hands everything to
  shards.writer.finish_conversion with grayscale PNGs (lossless, mode "L"; the training transform
  makes them RGB, as for the digits).
- the CLI: `add_common_args`, and `run_cli` (shards.writer's, re-exported), which turns a bad input into one line on stderr and
  exit code 2 (no traceback).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import os
import pickle
from typing import Optional, Sequence

import numpy as np

from shards.digits import encode_png  # uint8 (H, W) -> mode "L" PNG; the digits converter's encoder
from shards.writer import SampleSpec, finish_conversion, run_cli, sha256_file  # noqa: F401  (run_cli: for the converters)

DEFAULT_MAX_PER_SHARD = 1000
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class SourceMissing(ValueError):
    """The package or one of its data files is not there; the message says how to install it."""


# ----------------------------------------------------------------------------- locating files
def package_dir(package: str, install: str) -> str:
    """Folder of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a broken or half-removed install
        spec = None
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locs:
        raise SourceMissing(f"the Python package {package!r} is not installed; install it with `{install}` "
                            f"(or pass --src)")
    return locs[0]


def require_files(folder: str, names: Sequence[str], install: str) -> list[str]:
    """Paths of names inside folder; SourceMissing naming the first absent one and the fix."""
    paths = [os.path.join(folder, n) for n in names]
    for p in paths:
        if not os.path.isfile(p):
            raise SourceMissing(f"{p} is missing (expected {', '.join(names)} in {folder}); install the data "
                                f"with `{install}` or point --src at a folder holding them")
    return paths


# ----------------------------------------------------------------------------- readers
def read_idx(path: str) -> np.ndarray:
    """An IDX file (magic 0 0 <dtype> <ndim>, big-endian uint32 dims, then the data); .gz or plain."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # a truncated .gz raises EOFError, a non-gzip file OSError
        raise ValueError(f"{path} is not readable ({type(e).__name__}: {e}); reinstall or re-copy it") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (header {raw[:4].hex()}); expected 0000 08 0N")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, the header {dims} says {expected}; the file is truncated "
                         f"or damaged, reinstall or re-copy it")
    return np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(dims)


def read_gzip_pickle(path: str):
    """A gzip'd pickle; latin1 decodes the byte strings of Python 2 pickles (the classic mnist.pkl.gz)."""
    try:
        with gzip.open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as e:  # truncated: EOFError; not gzip: OSError; garbage: UnpicklingError, ...
        raise ValueError(f"{path} is not a readable gzip'd pickle ({type(e).__name__}: {e}); reinstall the "
                         f"package or re-copy the file") from None


# ----------------------------------------------------------------------------- common flow
def check_arrays(images: np.ndarray, labels: np.ndarray, num_classes: int, what: str,
                 shape: tuple = (28, 28)) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, *shape) images and int64 (N,) labels in 0..num_classes-1, or a ValueError naming `what`."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.shape[1:] != shape or images.ndim != 1 + len(shape):
        raise ValueError(f"{what}: images {images.dtype} {images.shape}, expected uint8 (N, "
                         f"{', '.join(map(str, shape))})")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what}: labels {labels.dtype} {labels.shape} for {len(images)} images; expected "
                         f"one integer label per image")
    bad = sorted({int(v) for v in labels if not 0 <= int(v) < num_classes})
    if bad:
        raise ValueError(f"{what}: labels {bad[:5]} outside 0..{num_classes - 1}")
    return images, labels.astype(np.int64)


def per_class_subset(labels: np.ndarray, positions: Sequence[int], n: int, seed: int, what: str) -> list[int]:
    """n positions per class out of `positions` (sorted result).

    Per class c: the class's positions in ascending order, permuted with numpy
    default_rng([seed, c, 1]), the first n kept. A smaller n gives a subset of a larger one's.
    """
    by_cls: dict[int, list[int]] = {}
    for p in positions:
        by_cls.setdefault(int(labels[p]), []).append(int(p))
    out: list[int] = []
    for c in sorted(by_cls):
        items = sorted(by_cls[c])
        if n > len(items):
            raise ValueError(f"{what}: {n} per class asked, class {c} has {len(items)}; lower the per-class count")
        perm = np.random.default_rng([seed, c, 1]).permutation(len(items))
        out.extend(items[i] for i in perm[:n])
    return sorted(out)


def array_specs(split: str, images: np.ndarray, labels: np.ndarray, positions: Sequence[int]) -> list[SampleSpec]:
    """One SampleSpec per position; key f"{split}_{class:04d}_{position:05d}", the pixels as source."""
    return [SampleSpec(f"{split}_{int(labels[p]):04d}_{int(p):05d}", int(labels[p]), np.ascontiguousarray(images[p]),
                       hashlib.sha256(images[p].tobytes()).hexdigest()[:16])
            for p in positions]


def convert_arrays(out: str, *, dataset: str, class_names: Sequence[str],
                   parts: dict[str, tuple[np.ndarray, np.ndarray, Sequence[int]]], split_info: dict,
                   created_by: dict, per_class: Optional[dict[str, Optional[int]]] = None, subset_seed: int = 0,
                   max_per_shard: int = DEFAULT_MAX_PER_SHARD, workers: int = 1, progress: bool = True) -> str:
    """parts: split -> (images, labels, positions of that split in those arrays). Returns index.json.

    per_class: split -> n (or None = all) for a seeded per-class subset; recorded in split_info."""
    info = dict(split_info)
    samples = {}
    subset = {}
    for split, (images, labels, positions) in parts.items():
        n = (per_class or {}).get(split)
        if n is not None:
            if n < 1:
                raise ValueError(f"per-class count for {split!r} is {n}; it must be >= 1")
            positions = per_class_subset(labels, positions, n, subset_seed, f"{dataset} split {split!r}")
            subset[split] = n
        samples[split] = array_specs(split, images, labels, positions)
    if subset:
        info["subset"] = {"per_class": subset, "seed": subset_seed,
                          "rule": "per class: ascending positions permuted with numpy default_rng([seed, class, 1]);"
                                  " the first n kept"}
    return finish_conversion(out, dataset, class_names, samples, encode_png, {}, info, created_by,
                             max_per_shard=max_per_shard, workers=workers, progress=progress)


def file_hashes(paths: Sequence[str]) -> dict[str, str]:
    """{file name: sha256}: recorded in split_info so an index names the exact source files."""
    return {os.path.basename(p): sha256_file(p) for p in paths}


# ----------------------------------------------------------------------------- CLI
def add_common_args(ap: argparse.ArgumentParser, src_help: str) -> None:
    ap.add_argument("--out", required=True, help="output folder (shards + index.json)")
    ap.add_argument("--src", default=None, help=src_help)
    ap.add_argument("--per-class-train", type=int, default=None, help="keep N train images per class (seeded)")
    ap.add_argument("--per-class-test", type=int, default=None, help="keep M test images per class (seeded)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split (where one is made) and of the subsets")
    ap.add_argument("--workers", type=int, default=1, help="processes encoding shards")
    ap.add_argument("--max-per-shard", type=int, default=DEFAULT_MAX_PER_SHARD,
                    help="samples per shard; larger classes get several shards, smaller ones share")
