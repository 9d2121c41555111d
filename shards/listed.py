"""Shared checks of the converters whose split comes from list files (CUB-200-2011, DomainNet) and the
per-class report every converter of a paper dataset adds to its index (ImageNet-A too).

- `require_files`: every listed image must exist; otherwise one ValueError naming the first missing
  files, how many there are, and the list file that names them (before any shard is written).
- `samples_by_folder`: SampleSpecs through shards.imagefolder's key and fingerprint rules, so keys
  look the same as for the folder converters (`{split}_{class id:04d}_{stem}`).
- `list_provenance`: name, sha256 and line count of each list file, recorded in split_info.
- `report_classes`: reads a written index and records, in split_info.class_report, the classes with
  no image in a split or fewer than `few` images in it (ImageNet-A has classes with a handful of
  images: they are kept, and named here and on stderr); a class with no image in any split is an
  error raised by the converters before conversion (`require_nonempty`).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

from shards.imagefolder import DEFAULT_MAX_PER_SHARD, _specs  # _specs: private there; its key + fingerprint rules
from shards.writer import SampleSpec, atomic_write_json, sha256_file

FEW_IMAGES = 5  # a class with fewer images than this in a split is named in the report


def require_files(root: str, rel_paths: Sequence[str], listed_in: str) -> None:
    """ValueError naming the missing ones when any of root/rel_path is not a file."""
    missing = [p for p in rel_paths if not os.path.isfile(os.path.join(root, p))]
    if missing:
        shown = ", ".join(repr(p) for p in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{len(missing)} image(s) listed in {listed_in} are missing under {root!r}: {shown}{more}; "
                         f"restore them (re-extract the archive) or point --src at the folder that holds them")


def require_nonempty(class_names: Sequence[str], by_split: dict[str, list[tuple[int, str]]], source: str) -> None:
    """ValueError when a class has no image in any split (it could never be trained or tested).
    by_split: {split: [(class id, path)]}."""
    seen = {c for items in by_split.values() for c, _ in items}
    empty = [f"{c} ({class_names[c]})" for c in range(len(class_names)) if c not in seen]
    if empty:
        raise ValueError(f"{len(empty)} class(es) of {source} have no image in any split: {', '.join(empty[:5])}; "
                         f"the dataset copy is incomplete: restore those classes' images")


def add_output_args(ap, num_classes: int) -> None:
    """The command-line options the list-file converters share (after their own --src)."""
    ap.add_argument("--out", required=True, help="output folder (shards + index.json)")
    ap.add_argument("--resize-shorter", type=int, default=None, help="shrink the shorter side to N pixels")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="processes")
    ap.add_argument("--max-per-shard", type=int, default=DEFAULT_MAX_PER_SHARD, help="samples per shard")
    ap.add_argument("--num-classes", type=int, default=num_classes, help=f"classes expected ({num_classes})")
    ap.add_argument("--few", type=int, default=FEW_IMAGES, help="report classes with fewer images than this")


def samples_by_folder(src: str, root: str, split: str, items: Sequence[tuple[int, str]],
                      used: set[str]) -> list[SampleSpec]:
    """items: (class id, path relative to root) -> SampleSpecs, grouped by (class, folder) in order."""
    groups: dict[tuple[int, str], list[str]] = {}
    for cls, rel in items:
        folder, name = os.path.split(rel)
        groups.setdefault((cls, folder), []).append(name)
    out: list[SampleSpec] = []
    for (cls, folder), names in sorted(groups.items()):
        out += _specs(src, os.path.join(root, folder), split, cls, sorted(names), used)
    return out


def list_provenance(paths: Sequence[str]) -> list[dict]:
    """[{file, sha256, lines}] of the list files a split was read from."""
    out = []
    for p in paths:
        with open(p, "rb") as f:
            lines = sum(1 for line in f if line.strip())
        out.append({"file": os.path.basename(p), "sha256": sha256_file(p), "lines": lines})
    return out


def report_classes(index_path: str, few: int = FEW_IMAGES, reference: Optional[dict] = None,
                   stream=None) -> dict:
    """Add split_info.class_report to the index at index_path (rewritten atomically); return it.

    reference: {split: expected sample count} from the dataset's documentation or the authors'
    logs; a different count is reported (a warning, not an error: copies of a dataset differ)."""
    stream = stream or sys.stderr
    with open(index_path) as f:
        index = json.load(f)
    names = index["class_names"]
    report: dict = {"few_images_threshold": few, "empty": {}, "few": {}, "count_differs": {}}
    for split, s in index["splits"].items():
        empty = [names[c] for c, n in enumerate(s["per_class"]) if n == 0]
        few_here = {names[c]: n for c, n in enumerate(s["per_class"]) if 0 < n < few}
        if empty:
            report["empty"][split] = empty
        if few_here:
            report["few"][split] = few_here
        if reference and split in reference and s["num_samples"] != reference[split]:
            report["count_differs"][split] = {"got": s["num_samples"], "reference": reference[split]}
    for split, cs in report["empty"].items():
        print(f"warning: {index['dataset']}: {len(cs)} class(es) have no {split} image: {cs[:8]}", file=stream)
    for split, cs in report["few"].items():
        print(f"warning: {index['dataset']}: {len(cs)} class(es) have fewer than {few} {split} images: "
              f"{dict(list(cs.items())[:8])}", file=stream)
    for split, d in report["count_differs"].items():
        print(f"warning: {index['dataset']}: split {split!r} holds {d['got']} images, the reference count is "
              f"{d['reference']}: check that this is the intended copy of the dataset", file=stream)
    index["split_info"]["class_report"] = report
    atomic_write_json(index_path, index)
    return report


def parse_pairs(path: str, what: str) -> list[tuple[str, str]]:
    """Lines of two whitespace-separated fields (`a b`); a malformed line names file and line."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rsplit(None, 1) if what == "path label" else line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{n}: expected '{what}', got {line.strip()!r}")
            out.append((parts[0], parts[1]))
    return out
