"""shards.imagenet_a on a generated pre-split ImageNet-A-like copy: uneven classes, a class absent
from test/, the class report in the index, and the loader reading a converted copy."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from sdlora_ds.config import DataConfig
from sdlora_ds.data import ShardIndex, build_loader
from shards.imagenet_a import convert_imagenet_a

WNIDS = ["n01498041", "n01531178", "n01534433", "n01558993"]


def jpeg(path, rng):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    w, h = (int(v) for v in rng.integers(24, 64, 2))
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=85)


def make_presplit(root, train=(6, 2, 9, 3), test=(2, 1, 0, 1), seed=0):
    """test count 0 -> that class's folder is absent from test/ (as in sparse copies)."""
    rng = np.random.default_rng(seed)
    for split, sizes in (("train", train), ("test", test)):
        for wnid, n in zip(WNIDS, sizes):
            for i in range(n):
                jpeg(os.path.join(root, split, wnid, f"{i:04d}.jpg"), rng)


def convert(src, out, **kw):
    path = convert_imagenet_a(src, out, num_classes=len(WNIDS), progress=False, **kw)
    return path, json.load(open(path))


def test_presplit_counts_provenance_and_class_report(tmp_path, capsys):
    src = str(tmp_path / "imagenet-a")
    make_presplit(src)
    path, idx = convert(src, str(tmp_path / "o"), few=3)
    assert idx["dataset"] == "imagenet-a" and idx["class_names"] == WNIDS
    assert idx["created_by"]["converter"] == "shards.imagenet_a"
    assert idx["splits"]["train"]["per_class"] == [6, 2, 9, 3]
    assert idx["splits"]["test"]["per_class"] == [2, 1, 0, 1]
    info = idx["split_info"]
    assert info["method"] == "pre-split" and len(info["file_list_sha256"]) == 64
    rep = info["class_report"]
    assert rep["empty"] == {"test": [WNIDS[2]]}
    assert rep["few"] == {"train": {WNIDS[1]: 2}, "test": {WNIDS[0]: 2, WNIDS[1]: 1, WNIDS[3]: 1}}
    assert rep["count_differs"] == {}  # the 1,519 check applies to the full 200-class copy only
    err = capsys.readouterr().err
    assert "have no test image" in err and WNIDS[2] in err
    ShardIndex.load(path, verify_checksums=True)  # the annotated index is still a valid index


def test_sparse_class_reads_through_the_loader(tmp_path):
    src = str(tmp_path / "imagenet-a")
    make_presplit(src)
    path, idx = convert(src, str(tmp_path / "o"))
    index = ShardIndex.load(path)
    cfg = DataConfig(index=path, image_size=16, test_resize=16)
    y = [int(v) for _, ys in build_loader(index, cfg, split="test", class_ids=[1, 2], train=False, batch_size=4,
                                          rank=0, world_size=1, seed=0) for v in ys if v >= 0]
    assert y == [1]  # class 2 has no test image: the task's test stream holds class 1's one image
    n = sum(len(ys) for _, ys in build_loader(index, cfg, split="train", class_ids=[1, 2], train=True,
                                             batch_size=4, rank=0, world_size=1, seed=0))
    assert n == 11


def test_reference_count_checked_on_full_copies(tmp_path, capsys, monkeypatch):
    import shards.imagenet_a as A
    src = str(tmp_path / "imagenet-a")
    make_presplit(src)
    monkeypatch.setattr(A, "NUM_CLASSES", len(WNIDS))  # pretend this is the full class set
    _, idx = convert(src, str(tmp_path / "o"))
    assert idx["split_info"]["class_report"]["count_differs"] == {"test": {"got": 4, "reference": 1519}}
    assert "reference count is 1519" in capsys.readouterr().err


def test_oddities(tmp_path):
    src = str(tmp_path / "imagenet-a")
    make_presplit(src)
    with pytest.raises(ValueError, match="holds 4 class folders, imagenet-a has 200"):
        convert_imagenet_a(src, str(tmp_path / "o"), progress=False)
    os.makedirs(os.path.join(src, "test", WNIDS[2]))  # an empty class folder: remove it or restore its files
    with pytest.raises(ValueError, match="hold no images"):
        convert(src, str(tmp_path / "o2"))
    os.rmdir(os.path.join(src, "test", WNIDS[2]))
    open(os.path.join(src, "train", WNIDS[0], "0001.jpg"), "wb").write(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match="0001.jpg' is corrupt"):
        convert(src, str(tmp_path / "o3"))


def test_single_tree_gets_seeded_split(tmp_path):
    rng = np.random.default_rng(1)
    src = str(tmp_path / "official")
    for wnid, n in zip(WNIDS, (10, 3, 1, 6)):
        for i in range(n):
            jpeg(os.path.join(src, wnid, f"{i}.jpg"), rng)
    _, idx = convert(src, str(tmp_path / "o"))
    assert idx["split_info"]["method"] == "seeded per-class split"
    assert idx["splits"]["test"]["per_class"] == [2, 1, 0, 1]  # round(0.2 * n); a 1-image class: train only
    assert idx["split_info"]["class_report"]["empty"] == {"test": [WNIDS[2]]}
