"""shards.fashion_mnist on a fake copy of the dataset-fashion-mnist layout (four IDX .gz files)."""
import gzip
import json
import os
import struct

import numpy as np
import pytest

from array_shard_fixtures import assert_one_line_error, fake_images, position, read_back, run_module
from shards.fashion_mnist import CLASS_NAMES, FILES, convert_fashion_mnist

COUNTS = {"train": 6, "test": 2}  # per class; the real files: 6,000 and 1,000


def write_idx(path, arr: np.ndarray) -> None:
    """IDX: 0x0000, dtype code 0x08 (uint8), ndim, big-endian uint32 dims, then the bytes."""
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes())


def make_fake(root) -> dict:
    """The four files with shuffled labels; returns {split: (images, labels)}."""
    os.makedirs(root, exist_ok=True)
    out = {}
    for i, (split, (img_name, lab_name)) in enumerate(FILES.items()):
        labels = np.random.default_rng(i).permutation(np.repeat(np.arange(10, dtype=np.uint8), COUNTS[split]))
        images = fake_images(len(labels), seed=10 + i)
        write_idx(os.path.join(root, img_name), images)
        write_idx(os.path.join(root, lab_name), labels)
        out[split] = (images, labels)
    return out


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fm") / "fashion-mnist")
    return root, make_fake(root)


def test_official_split_counts_labels_pixels(fake, tmp_path):
    root, arrays = fake
    idx, got = read_back(convert_fashion_mnist(str(tmp_path / "o"), src=root, progress=False))
    assert idx["class_names"] == CLASS_NAMES and idx["num_classes"] == 10
    assert idx["splits"]["train"]["per_class"] == [6] * 10 and idx["splits"]["test"]["per_class"] == [2] * 10
    assert idx["split_info"]["method"] == "pre-split"
    assert set(idx["split_info"]["source_sha256"]) == {n for pair in FILES.values() for n in pair}
    for split, (images, labels) in arrays.items():
        assert sorted(position(k) for k in got[split]) == list(range(len(labels)))
        for key, (cls, px) in got[split].items():
            assert cls == labels[position(key)] and np.array_equal(px, images[position(key)])


def test_deterministic_and_subset(fake, tmp_path):
    root, arrays = fake
    a = json.load(open(convert_fashion_mnist(str(tmp_path / "a"), src=root, progress=False)))
    b = json.load(open(convert_fashion_mnist(str(tmp_path / "b"), src=root, workers=2, progress=False)))
    assert a == b
    idx, got = read_back(convert_fashion_mnist(str(tmp_path / "s"), src=root, per_class_train=3, seed=5,
                                               progress=False))
    assert idx["splits"]["train"]["per_class"] == [3] * 10 and idx["splits"]["test"]["per_class"] == [2] * 10
    assert idx["split_info"]["subset"]["per_class"] == {"train": 3} and idx["split_info"]["subset"]["seed"] == 5
    again = json.load(open(convert_fashion_mnist(str(tmp_path / "s2"), src=root, per_class_train=3, seed=5,
                                                 progress=False)))
    other = json.load(open(convert_fashion_mnist(str(tmp_path / "s3"), src=root, per_class_train=3, seed=6,
                                                 progress=False)))
    assert again["split_info"]["file_list_sha256"] == idx["split_info"]["file_list_sha256"]
    assert other["split_info"]["file_list_sha256"] != idx["split_info"]["file_list_sha256"]


def test_cli_missing_and_truncated_files(fake, tmp_path):
    root, _ = fake
    r = run_module("shards.fashion_mnist", "--out", str(tmp_path / "cli"), "--src", root)
    assert r.returncode == 0, r.stderr
    assert json.load(open(tmp_path / "cli" / "index.json"))["splits"]["test"]["num_samples"] == 20
    assert_one_line_error(run_module("shards.fashion_mnist", "--out", str(tmp_path / "o"), "--src",
                                     str(tmp_path / "nowhere")),
                          "train-images-idx3-ubyte.gz is missing", "apt-get install dataset-fashion-mnist")
    bad = str(tmp_path / "bad")
    make_fake(bad)
    path = os.path.join(bad, "t10k-images-idx3-ubyte.gz")
    raw = gzip.open(path).read()
    with gzip.open(path, "wb") as f:
        f.write(raw[:-28])  # one image short
    assert_one_line_error(run_module("shards.fashion_mnist", "--out", str(tmp_path / "o"), "--src", bad),
                          "t10k-images-idx3-ubyte.gz", "truncated")
