"""DomainNet (345 classes, six domains, ~0.6M images) as shards, with the split given by list files.

    python -m shards.domainnet --src domainnet --out data/domainnet [--train-lists a_train.txt ...]
                               [--test-lists a_test.txt ...] [--workers 8] [--resize-shorter 256]

--src holds the extracted domain folders (clipart/, infograph/, painting/, quickdraw/, real/,
sketch/, each <domain>/<class>/<file>.jpg) and the list files of the release, one line per image:
`<domain>/<class>/<file>.jpg <label>`, label 0..344. By default every `*_train.txt` in --src forms
the train split and every `*_test.txt` the test split (all six domains together, the usual CIL
protocol); --train-lists / --test-lists name the list files instead (paths, or names in --src).
Class id = the label; class name = the class folder of its images. Checked before any shard is
written, each error naming list file and line: a malformed line; a label outside 0..num_classes-1;
inconsistent labels (one label used for two class folders, or one folder under two labels); a
file listed twice or in both splits; listed files missing on disk (named); a class with no image
in any list. The index records every list file's sha256 and line count (split_info.list_files)
and the images per domain and split; classes with few or no images in a split are reported
(split_info.class_report).
"""
from __future__ import annotations

import argparse
import glob
import os
from typing import Optional, Sequence

from shards.imagefolder import DEFAULT_MAX_PER_SHARD, encode_file
from shards.listed import (FEW_IMAGES, add_output_args, list_provenance, parse_pairs, report_classes,
                           require_files, require_nonempty, samples_by_folder)
from shards.writer import finish_conversion

NUM_CLASSES = 345
DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")


def _resolve(src: str, given: Optional[Sequence[str]], suffix: str) -> list[str]:
    if not given:
        found = sorted(glob.glob(os.path.join(src, f"*{suffix}")))
        if not found:
            raise ValueError(f"no *{suffix} list file in {src!r}; put the release's list files there or pass "
                             f"--train-lists/--test-lists")
        return found
    out = []
    for g in given:
        p = g if os.path.isfile(g) else os.path.join(src, g)
        if not os.path.isfile(p):
            raise ValueError(f"list file {g!r} does not exist (nor in {src!r})")
        out.append(os.path.abspath(p))
    return out


def domainnet_samples(src: str, lists: dict[str, list[str]], num_classes: int = NUM_CLASSES):
    """(class names, {split: [(label, relative path)]}, {split: {domain: count}}) after the checks."""
    folder_of: dict[int, tuple[str, str]] = {}   # label -> (class folder, where first seen)
    label_of: dict[str, tuple[int, str]] = {}    # class folder -> (label, where first seen)
    seen: dict[str, str] = {}                    # relative path -> where listed
    by_split: dict[str, list[tuple[int, str]]] = {}
    domains: dict[str, dict[str, int]] = {}
    for split, files in lists.items():
        by_split[split], domains[split] = [], {}
        for path in files:
            for n, (rel, lab) in enumerate(parse_pairs(path, "path label"), 1):
                where = f"{os.path.basename(path)}:{n}"
                parts = rel.split("/")
                if len(parts) != 3:
                    raise ValueError(f"{path}:{n}: path {rel!r} is not <domain>/<class>/<file>")
                try:
                    label = int(lab)
                except ValueError:
                    raise ValueError(f"{path}:{n}: label {lab!r} is not an integer") from None
                if not 0 <= label < num_classes:
                    raise ValueError(f"{path}:{n}: label {label} outside 0..{num_classes - 1} (DomainNet has "
                                     f"{num_classes} classes)")
                domain, folder = parts[0], parts[1]
                if domain not in DOMAINS:
                    raise ValueError(f"{path}:{n}: domain {domain!r} of {rel!r} is not a DomainNet domain {DOMAINS}")
                f0, w0 = folder_of.setdefault(label, (folder, where))
                l0, w1 = label_of.setdefault(folder, (label, where))
                if f0 != folder:
                    raise ValueError(f"inconsistent labels: {where}: {rel!r} has label {label}, which {w0} gives to "
                                     f"class {f0!r}; restore the release's list files")
                if l0 != label:
                    raise ValueError(f"inconsistent labels: {where}: {rel!r} has label {label}, but {w1} gives class "
                                     f"{folder!r} label {l0}; restore the release's list files")
                if rel in seen:
                    raise ValueError(f"{where}: {rel!r} is already listed at {seen[rel]} (a file may be listed once, "
                                     f"in one split); restore the release's list files")
                seen[rel] = where
                by_split[split].append((label, rel))
                domains[split][domain] = domains[split].get(domain, 0) + 1
    for split, files in lists.items():
        require_files(src, [rel for _, rel in by_split[split]], ", ".join(os.path.basename(f) for f in files))
    names = [folder_of[c][0] if c in folder_of else f"<label {c}>" for c in range(num_classes)]
    require_nonempty(names, by_split, "the list files")
    return names, by_split, domains


def convert_domainnet(src: str, out: str, *, train_lists: Optional[Sequence[str]] = None,
                      test_lists: Optional[Sequence[str]] = None, resize_shorter=None, workers: int = 1,
                      max_per_shard: int = DEFAULT_MAX_PER_SHARD, progress: bool = True,
                      num_classes: int = NUM_CLASSES, few: int = FEW_IMAGES) -> str:
    """Returns the index.json path. num_classes: the labels expected (345; tests use fewer)."""
    src = os.path.abspath(src)
    if not os.path.isdir(src):
        raise ValueError(f"--src {src!r} does not exist; pass the folder holding the domain folders and list files")
    lists = {"train": _resolve(src, train_lists, "_train.txt"), "test": _resolve(src, test_lists, "_test.txt")}
    names, by_split, domains = domainnet_samples(src, lists, num_classes)
    used: set[str] = set()
    samples = {sp: samples_by_folder(src, src, sp, items, used) for sp, items in by_split.items()}
    info = {"method": "list files", "rule": "each list line '<domain>/<class>/<file> <label>'; label = class id",
            "list_files": {sp: list_provenance(fs) for sp, fs in lists.items()}, "domains": domains}
    created_by = {"converter": "shards.domainnet",
                  "args": {"src": src, "train_lists": [os.path.basename(f) for f in lists["train"]],
                           "test_lists": [os.path.basename(f) for f in lists["test"]],
                           "resize_shorter": resize_shorter, "max_per_shard": max_per_shard}}
    path = finish_conversion(out, "domainnet", names, samples, encode_file, {"resize_shorter": resize_shorter},
                             info, created_by, max_per_shard=max_per_shard, workers=workers, progress=progress)
    report_classes(path, few=few)
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True, help="folder with the domain folders and the list files")
    ap.add_argument("--train-lists", nargs="+", default=None, help="train list files (default: --src/*_train.txt)")
    ap.add_argument("--test-lists", nargs="+", default=None, help="test list files (default: --src/*_test.txt)")
    add_output_args(ap, NUM_CLASSES)
    a = ap.parse_args(argv)
    print(convert_domainnet(a.src, a.out, train_lists=a.train_lists, test_lists=a.test_lists,
                            resize_shorter=a.resize_shorter, workers=a.workers, max_per_shard=a.max_per_shard,
                            num_classes=a.num_classes, few=a.few))


if __name__ == "__main__":
    main()
