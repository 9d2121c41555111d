"""shards.cub on a generated copy of the CUB-200-2011 layout (images/ + the four list files),
including its oddities: missing listed files, inconsistent labels, mismatched lists, empty classes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from sdlora_ds.data import ShardIndex
from shards.cub import convert_cub

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
# (class index, is_train) per image, in image-id order (ids 1..)
IMAGES = [(0, 1), (0, 0), (0, 1), (1, 1), (1, 0), (1, 0), (2, 1), (2, 1), (2, 0), (0, 1)]


def make_cub(root, images=IMAGES, seed=0):
    rng = np.random.default_rng(seed)
    lines = {"classes.txt": [f"{i + 1} {c}" for i, c in enumerate(CLASSES)], "images.txt": [],
             "image_class_labels.txt": [], "train_test_split.txt": []}
    for k, (c, tr) in enumerate(images, 1):
        rel = f"{CLASSES[c]}/{CLASSES[c][4:]}_{k:04d}_{100 + k}.jpg"
        os.makedirs(os.path.join(root, "images", CLASSES[c]), exist_ok=True)
        w, h = (int(v) for v in rng.integers(20, 60, 2))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(root, "images", rel))
        lines["images.txt"].append(f"{k} {rel}")
        lines["image_class_labels.txt"].append(f"{k} {c + 1}")
        lines["train_test_split.txt"].append(f"{k} {tr}")
    for name, ls in lines.items():
        open(os.path.join(root, name), "w").write("\n".join(ls) + "\n")
    return root


def edit(root, name, fn):
    p = os.path.join(root, name)
    lines = fn(open(p).read().split("\n")[:-1])
    open(p, "w").write("\n".join(lines) + "\n")


def convert(src, out, **kw):
    return convert_cub(src, out, num_classes=len(CLASSES), progress=False, **kw)


def test_official_split_labels_and_provenance(tmp_path):
    src = make_cub(str(tmp_path / "CUB_200_2011"))
    out = str(tmp_path / "o")
    path = convert(src, out)
    idx = json.load(open(path))
    assert idx["dataset"] == "cub-200-2011" and idx["class_names"] == CLASSES
    assert idx["splits"]["train"]["per_class"] == [3, 1, 2] and idx["splits"]["test"]["per_class"] == [1, 2, 1]
    info = idx["split_info"]
    assert info["method"] == "official split"
    assert [f["file"] for f in info["list_files"]] == ["classes.txt", "images.txt", "image_class_labels.txt",
                                                      "train_test_split.txt"]
    assert all(len(f["sha256"]) == 64 for f in info["list_files"]) and info["list_files"][1]["lines"] == 10
    assert info["class_report"]["few"]["train"] == {CLASSES[0]: 3, CLASSES[1]: 1, CLASSES[2]: 2}
    # every image lands in its split with its label, bytes unchanged
    by_key = {}
    for split, s in idx["splits"].items():
        for sh in s["shards"]:
            for sample in wds.WebDataset(os.path.join(out, sh["path"]), shardshuffle=False):
                by_key[sample["__key__"]] = (split, int(sample["cls"]), sample["jpg"])
    assert len(by_key) == 10
    for k, (c, tr) in enumerate(IMAGES, 1):
        key = f"{'train' if tr else 'test'}_{c:04d}_{CLASSES[c][4:]}_{k:04d}_{100 + k}"
        rel = f"{CLASSES[c]}/{CLASSES[c][4:]}_{k:04d}_{100 + k}.jpg"
        assert by_key[key][:2] == ("train" if tr else "test", c)
        assert by_key[key][2] == open(os.path.join(src, "images", rel), "rb").read()
    ShardIndex.load(path, verify_checksums=True)


def test_missing_listed_files_are_named(tmp_path):
    src = make_cub(str(tmp_path / "c"))
    gone = [f"{CLASSES[1]}/{CLASSES[1][4:]}_0005_105.jpg", f"{CLASSES[2]}/{CLASSES[2][4:]}_0008_108.jpg"]
    for g in gone:
        os.remove(os.path.join(src, "images", g))
    with pytest.raises(ValueError) as e:
        convert(src, str(tmp_path / "o"))
    msg = str(e.value)
    assert "2 image(s) listed in images.txt are missing" in msg and all(g in msg for g in gone)
    assert not os.path.exists(tmp_path / "o" / "index.json")  # nothing written


def test_inconsistent_labels(tmp_path):
    src = make_cub(str(tmp_path / "c"))
    edit(src, "image_class_labels.txt", lambda ls: ["4 3" if line == "4 2" else line for line in ls])
    with pytest.raises(ValueError, match=r"inconsistent labels: 1 image.*image 4 '002.Laysan_Albatross/.*class 3"):
        convert(src, str(tmp_path / "o"))
    edit(src, "image_class_labels.txt", lambda ls: ["4 7" if line == "4 3" else line for line in ls])
    with pytest.raises(ValueError, match="image 4 has class '7', not an id of classes.txt"):
        convert(src, str(tmp_path / "o"))


def test_list_files_must_agree(tmp_path):
    src = make_cub(str(tmp_path / "c"))
    edit(src, "train_test_split.txt", lambda ls: ls[:-1])
    with pytest.raises(ValueError, match=r"images.txt and train_test_split.txt list different image ids.*\['10'\]"):
        convert(src, str(tmp_path / "o"))
    src = make_cub(str(tmp_path / "d"))
    edit(src, "images.txt", lambda ls: ls + [ls[0]])
    with pytest.raises(ValueError, match="id 1 is listed twice"):
        convert(src, str(tmp_path / "o"))
    src = make_cub(str(tmp_path / "e"))
    edit(src, "train_test_split.txt", lambda ls: ["3 2" if line == "3 1" else line for line in ls])
    with pytest.raises(ValueError, match="image 3 has '2'; expected 1"):
        convert(src, str(tmp_path / "o"))
    with pytest.raises(ValueError, match="classes.txt' does not exist"):
        convert(str(tmp_path / "nope"), str(tmp_path / "o"))


def test_empty_class_is_an_error_and_class_count_checked(tmp_path):
    src = make_cub(str(tmp_path / "c"), images=[(0, 1), (0, 0), (2, 1), (2, 0)])  # class 2 holds no image
    with pytest.raises(ValueError, match=r"1 class\(es\) of .*images.txt have no image in any split: 1 "
                                         r"\(002.Laysan_Albatross\)"):
        convert(src, str(tmp_path / "o"))
    with pytest.raises(ValueError, match="lists 3 classes, CUB-200-2011 has 200"):
        convert_cub(src, str(tmp_path / "o"), progress=False)


def test_cli(tmp_path):
    src = make_cub(str(tmp_path / "c"))
    r = subprocess.run([sys.executable, "-m", "shards.cub", "--src", src, "--out", str(tmp_path / "cli"),
                        "--num-classes", "3", "--workers", "2", "--resize-shorter", "24"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    idx = json.load(open(tmp_path / "cli" / "index.json"))
    assert idx["created_by"]["args"]["resize_shorter"] == 24
