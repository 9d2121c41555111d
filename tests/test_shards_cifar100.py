"""shards.cifar100 on generated CIFAR-like pickles."""
import io
import json
import os
import pickle

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from shards.cifar100 import convert_cifar100

NAMES = ["apple", "aquarium_fish", "baby", "bear"]


def make_cifar(root, n_train=12, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = [c for c in range(len(NAMES)) for _ in range(n)]
        rng.shuffle(labels)
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(os.path.join(root, split), "wb") as f:
            pickle.dump({b"filenames": [b"x.png"] * len(labels), b"fine_labels": labels,
                         b"coarse_labels": [0] * len(labels), b"data": data}, f)
    with open(os.path.join(root, "meta"), "wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in NAMES], b"coarse_label_names": [b"x"]}, f)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("c") / "cifar-100-python")
    make_cifar(root)
    return root


def test_counts_names_pixels(src, tmp_path):
    out = str(tmp_path / "o")
    idx = json.load(open(convert_cifar100(src, out, max_per_shard=12, progress=False)))
    assert idx["class_names"] == NAMES and idx["num_classes"] == 4
    assert idx["splits"]["train"]["per_class"] == [12] * 4 and idx["splits"]["test"]["per_class"] == [3] * 4
    assert len(idx["splits"]["train"]["shards"]) == 4  # one class per shard
    assert len(idx["splits"]["test"]["shards"]) == 1   # small classes share one
    assert idx["split_info"]["method"] == "pre-split" and set(idx["split_info"]["pickle_sha256"]) == {"train", "test"}
    raw = pickle.load(open(os.path.join(src, "train"), "rb"), encoding="bytes")
    sh = idx["splits"]["train"]["shards"][1]
    for sample in wds.WebDataset(os.path.join(out, sh["path"]), shardshuffle=False):
        i = int(sample["__key__"].rsplit("_", 1)[1])
        assert int(sample["cls"]) == raw[b"fine_labels"][i] == 1
        px = np.asarray(Image.open(io.BytesIO(sample["png"])))
        assert px.shape == (32, 32, 3) and np.array_equal(px, raw[b"data"][i].reshape(3, 32, 32).transpose(1, 2, 0))


def test_deterministic(src, tmp_path):
    a = json.load(open(convert_cifar100(src, str(tmp_path / "a"), progress=False)))
    b = json.load(open(convert_cifar100(src, str(tmp_path / "b"), workers=2, progress=False)))
    a["created_by"]["args"].pop("src"), b["created_by"]["args"].pop("src")
    assert a == b


def test_missing_and_corrupt_pickles(tmp_path):
    root = str(tmp_path / "c")
    make_cifar(root)
    os.remove(os.path.join(root, "meta"))
    with pytest.raises(ValueError, match=r"meta' is missing.*cifar-100-python"):
        convert_cifar100(root, str(tmp_path / "o"), progress=False)
    make_cifar(root)
    data = open(os.path.join(root, "test"), "rb").read()
    open(os.path.join(root, "test"), "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"test' is not a readable pickle"):
        convert_cifar100(root, str(tmp_path / "o"), progress=False)
