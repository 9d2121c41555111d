"""shards.digits: counts, disjoint stratified splits, determinism, stock readers, resume."""
import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from shards import writer
from shards.digits import MAX_PER_SHARD, digits_samples, encode_png, write_digits_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("digits"))
    return out, json.load(open(write_digits_shards(out, seed=0)))


def test_counts_and_split_ratios(built):
    _, idx = built
    s = idx["splits"]
    assert idx["format"] == "sdlora-ds-shards/1" and idx["num_classes"] == 10
    assert sum(s[k]["num_samples"] for k in ("pretrain", "train", "test")) == 1797
    for name, ratio in (("pretrain", 0.3), ("train", 0.5), ("test", 0.2)):
        assert abs(s[name]["num_samples"] / 1797 - ratio) < 0.01
        assert all(c > 0 for c in s[name]["per_class"])
    assert idx["split_info"]["seed"] == 0 and len(idx["split_info"]["file_list_sha256"]) == 64
    assert idx["created_by"]["converter"] == "shards.digits"


def test_shards_grouped_by_class_and_readable_by_stock_tools(built):
    out, idx = built
    keys = {}
    for split, s in idx["splits"].items():
        for sh in s["shards"]:
            path = os.path.join(out, sh["path"])
            assert hashlib.sha256(open(path, "rb").read()).hexdigest() == sh["sha256"]
            names = subprocess.run(["tar", "tf", path], capture_output=True, text=True, check=True).stdout.split()
            assert len(names) == 2 * sh["num_samples"]
            got = {}
            for sample in wds.WebDataset(path, shardshuffle=False):
                cls = int(sample["cls"])
                assert cls in sh["classes"]
                got[cls] = got.get(cls, 0) + 1
                img = Image.open(io.BytesIO(sample["png"]))
                assert img.size == (8, 8) and img.mode == "L"
                keys[sample["__key__"]] = split
            assert {str(c): n for c, n in got.items()} == sh["per_class"]
    assert len(keys) == 1797  # keys unique over all splits: the splits are disjoint
    assert all(k.startswith(split + "_") for k, split in keys.items())


def test_pixels_are_scaled_digits(built):
    from sklearn.datasets import load_digits
    out, idx = built
    d = load_digits()
    sh = idx["splits"]["test"]["shards"][0]
    sample = next(iter(wds.WebDataset(os.path.join(out, sh["path"]), shardshuffle=False)))
    i = int(sample["__key__"].rsplit("_", 1)[1])
    px = np.asarray(Image.open(io.BytesIO(sample["png"])))
    assert np.array_equal(px, np.minimum(d.images[i] * 16, 255).astype(np.uint8))
    assert int(sample["cls"]) == d.target[i]


def test_deterministic_and_seeded(built, tmp_path):
    out, idx = built
    again = json.load(open(write_digits_shards(str(tmp_path / "a"), seed=0)))
    assert again == idx  # identical index, so identical shard bytes (sha256)
    other = json.load(open(write_digits_shards(str(tmp_path / "b"), seed=1)))
    assert other["split_info"]["file_list_sha256"] != idx["split_info"]["file_list_sha256"]


def test_second_run_verifies_and_skips(tmp_path):
    out = str(tmp_path / "d")
    write_digits_shards(out)
    victim = os.path.join(out, "train", "train-000003.tar")
    open(victim, "ab").write(b"junk")  # damaged: must be rewritten
    jobs = [j for sp, ss in digits_samples(0).items() for j in writer.plan_shards(sp, ss, MAX_PER_SHARD)]
    _, stats = writer.convert(out, jobs, encode_png, {}, progress=False)
    assert stats == {"written": 1, "skipped": len(jobs) - 1, "bad_samples": 0, "stale_removed": 0}
    idx = json.load(open(os.path.join(out, "index.json")))
    entry = next(sh for sh in idx["splits"]["train"]["shards"] if sh["path"] == "train/train-000003.tar")
    assert hashlib.sha256(open(victim, "rb").read()).hexdigest() == entry["sha256"]


def test_cli(tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "shards.digits", "--out", str(out), "--seed", "0"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("index.json") and (out / "index.json").exists()
