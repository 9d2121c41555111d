"""sdlora_ds.data.index: loading, queries and the clear errors before training starts."""
import json
import os
import shutil

import pytest

from shards.digits import write_digits_shards
from sdlora_ds.data import ShardIndex


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("digits"))
    write_digits_shards(out, seed=0)
    return out


@pytest.fixture
def copy(digits_dir, tmp_path):
    dst = str(tmp_path / "d")
    shutil.copytree(digits_dir, dst)
    return dst


def test_load_and_queries(digits_dir):
    idx = ShardIndex.load(os.path.join(digits_dir, "index.json"), verify_checksums=True)
    assert idx.dataset == "digits" and idx.num_classes == 10 and idx.class_names == [str(i) for i in range(10)]
    assert set(idx.splits) == {"pretrain", "train", "test"} and idx.root == os.path.abspath(digits_dir)
    assert idx.count("train", range(10)) == idx.raw["splits"]["train"]["num_samples"]
    assert idx.count("test", [3]) == idx.raw["splits"]["test"]["per_class"][3]
    paths = idx.shard_paths("test", [3])
    assert len(paths) == 1 and os.path.isabs(paths[0]) and os.path.isfile(paths[0])
    held = [sh for sh in idx.raw["splits"]["test"]["shards"] if 3 in sh["classes"]]
    assert paths[0].endswith(held[0]["path"])  # only the shard holding class 3
    assert len(idx.shard_paths("train", [0, 1, 2])) == 3 < len(idx.shard_paths("train", range(10)))
    with pytest.raises(ValueError, match="split 'val' is not in"):
        idx.count("val", [0])
    with pytest.raises(ValueError, match=r"outside 0..9"):
        idx.shard_paths("train", [10])


def test_check_against_names_config_fields(digits_dir):
    idx = ShardIndex.load(os.path.join(digits_dir, "index.json"))
    idx.check_against(10, ["train", "test"])
    with pytest.raises(ValueError, match=r"'cil.num_classes' = 200 .* has 10 classes"):
        idx.check_against(200, ["train", "test"])
    with pytest.raises(ValueError, match=r"'data.train_split' = 'trn'.*available"):
        idx.check_against(10, ["trn", "test"])
    with pytest.raises(ValueError, match=r"'data.test_split' = 'val'"):
        idx.check_against(10, ["train", "val"])


def test_missing_index_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"does not exist.*python -m shards.<dataset> --out"):
        ShardIndex.load(str(tmp_path / "nope" / "index.json"))


def test_wrong_format(copy):
    path = os.path.join(copy, "index.json")
    raw = json.load(open(path))
    raw["format"] = "something/9"
    json.dump(raw, open(path, "w"))
    with pytest.raises(ValueError, match=r"format 'something/9', expected 'sdlora-ds-shards/1'"):
        ShardIndex.load(path)
    open(path, "w").write("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        ShardIndex.load(path)


def test_inconsistent_counts(copy):
    path = os.path.join(copy, "index.json")
    raw = json.load(open(path))
    raw["splits"]["train"]["shards"][0]["num_samples"] += 1
    json.dump(raw, open(path, "w"))
    with pytest.raises(ValueError, match="malformed"):
        ShardIndex.load(path)


def test_missing_shard(copy):
    os.remove(os.path.join(copy, "test", "test-000002.tar"))
    with pytest.raises(ValueError, match=r"test-000002.tar.*\(split 'test'\).* is missing"):
        ShardIndex.load(os.path.join(copy, "index.json"))


def test_checksum_mismatch_only_when_verifying(copy):
    shard = os.path.join(copy, "train", "train-000004.tar")
    data = bytearray(open(shard, "rb").read())
    data[700] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    ShardIndex.load(os.path.join(copy, "index.json"))  # not verified: loads
    with pytest.raises(ValueError, match=r"train-000004.tar' has sha256 .* the index .* says"):
        ShardIndex.load(os.path.join(copy, "index.json"), verify_checksums=True)
