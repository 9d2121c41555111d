"""shards.animal_mnist on a fake copy of the animal-mnist 0.4 package layout."""
import gzip
import importlib.util
import json
import os
import pickle

import numpy as np
import pytest

from array_shard_fixtures import assert_one_line_error, fake_images, position, read_back, run_module
from shards import animal_mnist
from shards.animal_mnist import CLASS_NAMES, convert_animal_mnist

PER_CLASS = 20  # the real package: 1,000


def make_package(site) -> str:
    """site/animal_mnist/{__init__.py, data/Animal_MNIST/*.gz} like the wheel; returns the data folder.
    The fake __init__ raises, so a converter that imports the package (the real one pulls
    tensorflow) fails."""
    pkg = os.path.join(site, "animal_mnist")
    folder = os.path.join(pkg, "data", "Animal_MNIST")
    os.makedirs(folder)
    with open(os.path.join(pkg, "__init__.py"), "w") as f:
        f.write("raise RuntimeError('the converter must not import animal_mnist')\n")
    images = fake_images(10 * PER_CLASS, seed=0)
    labels = np.repeat(np.arange(10, dtype=np.int64), PER_CLASS)  # stored class by class, as in the wheel
    for name, obj in (("animal_data_version_3.gz", images), ("animal_label_version_3.gz", labels)):
        with gzip.open(os.path.join(folder, name), "wb") as f:
            pickle.dump(obj, f)
    return folder


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("site"))
    make_package(root)
    return root


def _src(site):
    return os.path.join(site, "animal_mnist", "data", "Animal_MNIST")


def test_counts_labels_pixels_and_index(site, tmp_path):
    idx, got = read_back(convert_animal_mnist(str(tmp_path / "o"), src=_src(site), progress=False))
    assert idx["class_names"] == CLASS_NAMES and idx["dataset"] == "animal_mnist"
    assert idx["splits"]["train"]["per_class"] == [16] * 10 and idx["splits"]["test"]["per_class"] == [4] * 10
    info = idx["split_info"]
    assert info["method"] == "stratified" and info["seed"] == 0 and info["ratios"] == {"train": 0.8, "test": 0.2}
    assert set(info["source_sha256"]) == {"animal_data_version_3.gz", "animal_label_version_3.gz"}
    assert len(info["file_list_sha256"]) == 64 and "subset" not in info
    images = fake_images(10 * PER_CLASS, seed=0)
    seen = set()
    for split, samples in got.items():
        for key, (cls, px) in samples.items():
            p = position(key)
            assert cls == p // PER_CLASS and key.startswith(f"{split}_{cls:04d}_")
            assert np.array_equal(px, images[p])
            seen.add(p)
    assert seen == set(range(10 * PER_CLASS))  # train and test are disjoint and cover everything


def test_split_is_seeded_and_deterministic(site, tmp_path):
    a = json.load(open(convert_animal_mnist(str(tmp_path / "a"), src=_src(site), progress=False)))
    b = json.load(open(convert_animal_mnist(str(tmp_path / "b"), src=_src(site), workers=2, progress=False)))
    assert a == b  # same seed: same keys, same shard bytes (sha256), same index
    c = json.load(open(convert_animal_mnist(str(tmp_path / "c"), src=_src(site), seed=1, progress=False)))
    assert c["split_info"]["file_list_sha256"] != a["split_info"]["file_list_sha256"]
    assert c["splits"]["test"]["per_class"] == a["splits"]["test"]["per_class"]  # still stratified


def test_per_class_subset(site, tmp_path):
    idx, got = read_back(convert_animal_mnist(str(tmp_path / "s"), src=_src(site), per_class_train=5,
                                              per_class_test=2, progress=False))
    assert idx["splits"]["train"]["per_class"] == [5] * 10 and idx["splits"]["test"]["per_class"] == [2] * 10
    assert idx["split_info"]["subset"]["per_class"] == {"train": 5, "test": 2}
    _, full = read_back(convert_animal_mnist(str(tmp_path / "f"), src=_src(site), progress=False))
    _, bigger = read_back(convert_animal_mnist(str(tmp_path / "b"), src=_src(site), per_class_train=8,
                                               progress=False))
    for split in ("train", "test"):
        assert set(got[split]) <= set(full[split])  # a subset of the same split, never crossing it
    assert set(got["train"]) <= set(bigger["train"])  # smaller subsets nest in larger ones
    with pytest.raises(ValueError, match=r"17 per class asked, class 0 has 16"):
        convert_animal_mnist(str(tmp_path / "x"), src=_src(site), per_class_train=17, progress=False)


def test_finds_the_installed_package_without_importing_it(site, tmp_path):
    out = tmp_path / "cli"
    r = run_module("shards.animal_mnist", "--out", str(out), "--per-class-test", "3",
                   env_extra={"PYTHONPATH": site})
    assert r.returncode == 0, r.stderr
    idx = json.load(open(out / "index.json"))
    assert idx["created_by"]["args"]["src"] == _src(site)
    assert idx["splits"]["test"]["per_class"] == [3] * 10


def test_missing_package_and_files(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "animal_mnist" else real(name, *a))
    assert animal_mnist.main(["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install --no-deps animal-mnist==0.4" in err and "not installed" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_module("shards.animal_mnist", "--out", str(tmp_path / "o"), "--src", str(empty)),
                          "animal_data_version_3.gz is missing", "pip install --no-deps animal-mnist==0.4")


def test_corrupt_pickle(tmp_path):
    folder = make_package(str(tmp_path))
    path = os.path.join(folder, "animal_label_version_3.gz")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    assert_one_line_error(run_module("shards.animal_mnist", "--out", str(tmp_path / "o"), "--src", folder),
                          "animal_label_version_3.gz is not a readable gzip'd pickle")
