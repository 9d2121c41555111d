"""CUB-200-2011 (200 bird species, 11,788 images) as shards, with the official train/test split.

    python -m shards.cub --src CUB_200_2011 --out data/cub [--workers 8] [--resize-shorter 256]

--src is the extracted CUB_200_2011 folder of the official release:
    images/<NNN.Name>/<file>.jpg
    classes.txt               <class id> <NNN.Name>          (ids 1..200)
    images.txt                <image id> <NNN.Name>/<file>.jpg
    image_class_labels.txt    <image id> <class id>
    train_test_split.txt      <image id> <1 = train, 0 = test>
Class id in the shards = classes.txt id - 1; class names = the classes.txt names. Every check runs
before a shard is written, each error naming the file and what to fix: the four lists must cover
the same image ids once each; a label must be a classes.txt id and agree with the image's folder
(inconsistent labels); every listed image must exist (the missing ones are named); a class with
no image at all is an error. Classes with few or no images in one split are kept and reported
(split_info.class_report). The index records the four list files' sha256 (split_info.list_files)
and the official counts (5,994 train, 5,794 test); a copy with other counts is reported.
"""
from __future__ import annotations

import argparse
import os

from shards.imagefolder import DEFAULT_MAX_PER_SHARD, encode_file
from shards.listed import (FEW_IMAGES, add_output_args, list_provenance, parse_pairs, report_classes,
                           require_files, require_nonempty, samples_by_folder)
from shards.writer import finish_conversion

NUM_CLASSES = 200
REFERENCE_COUNTS = {"train": 5994, "test": 5794}  # the official split
LISTS = ("classes.txt", "images.txt", "image_class_labels.txt", "train_test_split.txt")


def _table(src: str, name: str) -> dict[str, str]:
    """{first field: second field} of one list file; a repeated id is an error."""
    path = os.path.join(src, name)
    if not os.path.isfile(path):
        raise ValueError(f"{path!r} does not exist; point --src at the extracted CUB_200_2011 folder "
                         f"(it holds images/ and {', '.join(LISTS)})")
    out: dict[str, str] = {}
    for a, b in parse_pairs(path, "id value"):
        if a in out:
            raise ValueError(f"{path}: id {a} is listed twice ({out[a]!r} and {b!r}); restore the official file")
        out[a] = b
    return out


def cub_samples(src: str, num_classes: int = NUM_CLASSES):
    """(class names, {split: [(class id, path relative to images/)]}) after every consistency check."""
    classes, images, labels, is_train = (_table(src, n) for n in LISTS)
    ids = sorted(classes, key=lambda v: int(v) if v.isdigit() else -1)
    if ids != [str(i) for i in range(1, len(ids) + 1)]:
        raise ValueError(f"{os.path.join(src, 'classes.txt')}: class ids must be 1..N in order, got {ids[:5]}...")
    if len(ids) != num_classes:
        raise ValueError(f"{os.path.join(src, 'classes.txt')} lists {len(ids)} classes, CUB-200-2011 has "
                         f"{num_classes}; point --src at the official release")
    names = [classes[i] for i in ids]
    for other, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train)):
        only_a, only_b = sorted(set(images) - set(table)), sorted(set(table) - set(images))
        if only_a or only_b:
            raise ValueError(f"images.txt and {other} list different image ids (only in images.txt: {only_a[:5]}, "
                             f"only in {other}: {only_b[:5]}); restore the official list files")
    by_split: dict[str, list[tuple[int, str]]] = {"train": [], "test": []}
    wrong: list[str] = []
    for img_id in sorted(images, key=lambda v: (len(v), v)):
        rel, label, flag = images[img_id], labels[img_id], is_train[img_id]
        if label not in classes:
            raise ValueError(f"image_class_labels.txt: image {img_id} has class {label!r}, not an id of classes.txt")
        if flag not in ("0", "1"):
            raise ValueError(f"train_test_split.txt: image {img_id} has {flag!r}; expected 1 (train) or 0 (test)")
        if rel.split("/")[0] != classes[label]:
            wrong.append(f"image {img_id} {rel!r} has class {label} ({classes[label]})")
        by_split["train" if flag == "1" else "test"].append((int(label) - 1, rel))
    if wrong:
        raise ValueError(f"inconsistent labels: {len(wrong)} image(s) of image_class_labels.txt disagree with "
                         f"their folder: {'; '.join(wrong[:3])}; restore the official list files")
    require_files(os.path.join(src, "images"), [rel for items in by_split.values() for _, rel in items],
                  "images.txt")
    require_nonempty(names, by_split, os.path.join(src, "images.txt"))
    return names, by_split


def convert_cub(src: str, out: str, *, resize_shorter=None, workers: int = 1,
                max_per_shard: int = DEFAULT_MAX_PER_SHARD, progress: bool = True,
                num_classes: int = NUM_CLASSES, few: int = FEW_IMAGES) -> str:
    """Returns the index.json path. num_classes: classes expected in classes.txt (200; tests use fewer)."""
    src = os.path.abspath(src)
    names, by_split = cub_samples(src, num_classes)
    used: set[str] = set()
    samples = {sp: samples_by_folder(src, os.path.join(src, "images"), sp, items, used)
               for sp, items in by_split.items()}
    info = {"method": "official split", "rule": "train_test_split.txt: 1 -> train, 0 -> test",
            "list_files": list_provenance([os.path.join(src, n) for n in LISTS])}
    created_by = {"converter": "shards.cub", "args": {"src": src, "resize_shorter": resize_shorter,
                                                      "max_per_shard": max_per_shard}}
    path = finish_conversion(out, "cub-200-2011", names, samples, encode_file, {"resize_shorter": resize_shorter},
                             info, created_by, max_per_shard=max_per_shard, workers=workers, progress=progress)
    report_classes(path, few=few, reference=REFERENCE_COUNTS if num_classes == NUM_CLASSES else None)
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True, help="the extracted CUB_200_2011 folder")
    add_output_args(ap, NUM_CLASSES)
    a = ap.parse_args(argv)
    print(convert_cub(a.src, a.out, resize_shorter=a.resize_shorter, workers=a.workers,
                      max_per_shard=a.max_per_shard, num_classes=a.num_classes, few=a.few))


if __name__ == "__main__":
    main()
