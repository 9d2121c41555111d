"""shards.mnist_mix on fake copies of its three sources (the other converters' test fixtures)."""
import os

import numpy as np
import pytest

from array_shard_fixtures import assert_one_line_error, read_back, run_module
from shards.mnist_mix import class_names, convert_mnist_mix
from test_shards_animal_mnist import make_package as make_animal
from test_shards_fashion_mnist import make_fake as make_fashion
from test_shards_mnist import make_package as make_mnist


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    animal = make_animal(str(root / "a"))
    fashion_dir = str(root / "fashion-mnist")
    fashion = make_fashion(fashion_dir)
    mnist_dir, mnist_parts = make_mnist(str(root / "m"))
    return {"animal": animal, "fashion": fashion_dir, "mnist": mnist_dir, "fashion_arrays": fashion,
            "mnist_parts": mnist_parts}


def _convert(sources, out, **kw):
    return convert_mnist_mix(out, animal_src=sources["animal"], fashion_src=sources["fashion"],
                             mnist_src=sources["mnist"], progress=False, **kw)


def test_thirty_classes_with_their_sources_and_pixels(sources, tmp_path):
    idx, got = read_back(_convert(sources, str(tmp_path / "o")))
    assert idx["num_classes"] == 30 and idx["class_names"] == class_names()
    assert idx["class_names"][0] == "animal:bear" and idx["class_names"][10] == "fashion:T-shirt/top"
    assert idx["class_names"][27] == "mnist:7"
    info = idx["split_info"]
    assert info["class_sources"]["0"] == "animal" and info["class_sources"]["15"] == "fashion"
    assert info["class_sources"]["29"] == "mnist" and set(info["sources"]) == {"animal", "fashion", "mnist"}
    # per class: animal 16 train / 4 test (80/20 of 20), fashion 6 / 2, mnist train+validation 3+2 / test 2
    assert idx["splits"]["train"]["per_class"] == [16] * 10 + [6] * 10 + [5] * 10
    assert idx["splits"]["test"]["per_class"] == [4] * 10 + [2] * 10 + [2] * 10
    # Fashion-MNIST's test images keep their pixels and move to classes 10-19
    f_images, f_labels = sources["fashion_arrays"]["test"]
    fashion_test = sorted((c, img.tobytes()) for c, img in got["test"].values() if 10 <= c < 20)
    expected = sorted((int(lab) + 10, img.tobytes()) for img, lab in zip(f_images, f_labels))
    assert fashion_test == expected
    # MNIST's official test images likewise, to classes 20-29
    m_images, m_labels = sources["mnist_parts"][2]
    mnist_test = sorted((c, img.tobytes()) for c, img in got["test"].values() if c >= 20)
    assert mnist_test == sorted((int(lab) + 20, img.tobytes()) for img, lab in zip(m_images, m_labels))
    assert len(set(got["train"]) | set(got["test"])) == len(got["train"]) + len(got["test"])  # unique keys


def test_per_class_subset_is_seeded(sources, tmp_path):
    a = read_back(_convert(sources, str(tmp_path / "a"), per_class_train=2, per_class_test=1, seed=3))[1]
    b = read_back(_convert(sources, str(tmp_path / "b"), per_class_train=2, per_class_test=1, seed=3))[1]
    def flat(d):
        return {s: {k: (c, img.tobytes()) for k, (c, img) in d[s].items()} for s in d}
    assert flat(a) == flat(b)  # same keys, classes and pixels
    counts = np.bincount([c for c, _ in a["train"].values()], minlength=30)
    assert counts.tolist() == [2] * 30


def test_a_missing_source_is_one_line(sources, tmp_path):
    r = run_module("shards.mnist_mix", "--out", str(tmp_path / "o"), "--animal-src", sources["animal"],
                   "--fashion-src", str(tmp_path / "nowhere"), "--mnist-src", sources["mnist"])
    assert_one_line_error(r, "nowhere", "dataset-fashion-mnist")
    r = run_module("shards.mnist_mix", "--out", str(tmp_path / "o"), "--src", sources["animal"])
    assert_one_line_error(r, "--animal-src")
    assert not os.path.exists(tmp_path / "o" / "index.json")
