"""shards.imagenet_r / shards.imagefolder on generated ImageNet-R-like folders."""
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

from sdlora_ds.data import ShardIndex, build_loader
from sdlora_ds.config import DataConfig
from shards.imagenet_r import convert_imagenet_r

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WNIDS = ["n01443537", "n01484850", "n01494475", "n01498041", "n01514859"]
SIZES = [10, 14, 7, 12, 11]


def make_tree(root, sizes=SIZES, seed=0, fmt="JPEG"):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    open(os.path.join(root, "README.txt"), "w").write("not a class\n")
    for wnid, n in zip(WNIDS, sizes):
        os.makedirs(os.path.join(root, wnid))
        for i in range(n):
            w, h = (int(v) for v in rng.integers(24, 72, 2))
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            name = ["art_{}.jpg", "sketch_{}.JPEG", "toy.{}.jpg"][i % 3].format(i)
            img.save(os.path.join(root, wnid, name), format=fmt, quality=90)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("src") / "imagenet-r")
    make_tree(root)
    return root


def convert(src, out, **kw):
    return json.load(open(convert_imagenet_r(src, out, num_classes=len(WNIDS), progress=False, **kw)))


def test_seeded_split_counts_and_index(tree, tmp_path):
    idx = convert(tree, str(tmp_path / "o"), max_per_shard=9)
    assert idx["class_names"] == WNIDS and idx["dataset"] == "imagenet-r"
    assert idx["splits"]["test"]["per_class"] == [round(0.2 * n) for n in SIZES]
    assert idx["splits"]["train"]["per_class"] == [n - round(0.2 * n) for n in SIZES]
    info = idx["split_info"]
    assert info["seed"] == 0 and info["test_fraction"] == 0.2 and len(info["file_list_sha256"]) == 64
    # class-grouped shards: a class bigger than max_per_shard gets shards of its own
    for sh in idx["splits"]["train"]["shards"]:
        assert sh["num_samples"] <= 9
        assert len(sh["classes"]) == 1 or all(idx["splits"]["train"]["per_class"][c] <= 9 for c in sh["classes"])


def test_original_bytes_stock_readers_and_keys(tree, tmp_path):
    out = str(tmp_path / "o")
    idx = convert(tree, out)
    sources = {}
    for wnid in WNIDS:
        for f in os.listdir(os.path.join(tree, wnid)):
            sources[hashlib.sha256(open(os.path.join(tree, wnid, f), "rb").read()).hexdigest()] = WNIDS.index(wnid)
    seen = 0
    for split, s in idx["splits"].items():
        for sh in s["shards"]:
            path = os.path.join(out, sh["path"])
            listing = subprocess.run(["tar", "tf", path], capture_output=True, text=True, check=True).stdout.split()
            assert len(listing) == 2 * sh["num_samples"]
            for sample in wds.WebDataset(path, shardshuffle=False):
                assert "." not in sample["__key__"] and sample["__key__"].startswith(split + "_")
                assert sources[hashlib.sha256(sample["jpg"]).hexdigest()] == int(sample["cls"])  # verbatim
                seen += 1
    assert seen == sum(SIZES)


def test_deterministic_and_seed_changes_split(tree, tmp_path):
    a = convert(tree, str(tmp_path / "a"))
    b = convert(tree, str(tmp_path / "b"), workers=2)  # process pool: same bytes
    assert a == b
    c = convert(tree, str(tmp_path / "c"), seed=1)
    assert c["split_info"]["file_list_sha256"] != a["split_info"]["file_list_sha256"]
    assert c["splits"]["test"]["per_class"] == a["splits"]["test"]["per_class"]


def test_second_run_skips_finished_and_rewrites_damaged(tree, tmp_path):
    out = str(tmp_path / "o")
    idx = convert(tree, out)
    paths = [os.path.join(out, sh["path"]) for s in idx["splits"].values() for sh in s["shards"]]
    mtimes = {p: os.stat(p).st_mtime_ns for p in paths}
    open(paths[0], "r+b").write(b"\0" * 10)  # damage one shard in place
    again = convert(tree, out)
    assert again == idx
    assert os.stat(paths[0]).st_mtime_ns != mtimes[paths[0]]  # rewritten
    assert all(os.stat(p).st_mtime_ns == mtimes[p] for p in paths[1:])  # verified and skipped
    ShardIndex.load(os.path.join(out, "index.json"), verify_checksums=True)


def test_pre_split_layout(tmp_path):
    src = str(tmp_path / "split")
    make_tree(os.path.join(src, "train"), sizes=[4, 5, 3, 6, 2])
    make_tree(os.path.join(src, "test"), sizes=[1, 2, 1, 1, 1], seed=1)
    idx = convert(src, str(tmp_path / "o"))
    assert idx["split_info"]["method"] == "pre-split"
    assert idx["splits"]["train"]["per_class"] == [4, 5, 3, 6, 2]
    assert idx["splits"]["test"]["per_class"] == [1, 2, 1, 1, 1]


def test_resize_shorter_side(tree, tmp_path):
    out = str(tmp_path / "o")
    idx = convert(tree, out, resize_shorter=30)
    shorter = []
    for sample in wds.WebDataset(os.path.join(out, idx["splits"]["train"]["shards"][0]["path"]), shardshuffle=False):
        img = Image.open(io.BytesIO(sample["jpg"]))
        assert img.format == "JPEG"
        shorter.append(min(img.size))
    assert max(shorter) == 30 and shorter.count(30) >= len(shorter) // 2  # smaller ones are kept as they are


def test_corrupt_and_missing_inputs(tree, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        convert(str(tmp_path / "nope"), str(tmp_path / "o"))
    with pytest.raises(ValueError, match=r"holds 5 class folders, imagenet-r has 200"):
        convert_imagenet_r(tree, str(tmp_path / "o"), progress=False)
    bad = str(tmp_path / "bad")
    make_tree(bad)
    victim = os.path.join(bad, WNIDS[2], "art_0.jpg")
    open(victim, "wb").write(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match=r"art_0.jpg' is corrupt"):
        convert(bad, str(tmp_path / "o2"), workers=2)
    os.makedirs(os.path.join(bad, "n09999999"))
    with pytest.raises(ValueError, match="hold no images"):
        convert(bad, str(tmp_path / "o3"))


def test_loader_on_converted_tree_two_ranks_two_workers(tree, tmp_path):
    idx_path = convert_imagenet_r(tree, str(tmp_path / "o"), num_classes=5, progress=False, max_per_shard=5)
    index = ShardIndex.load(idx_path, verify_checksums=True)
    cfg = DataConfig(index=idx_path, image_size=32, test_resize=36)
    per_class = [0] * 5
    lens = []
    for r in range(2):
        loader = build_loader(index, cfg, split="test", class_ids=range(5), train=False, batch_size=3, rank=r,
                              world_size=2, seed=0, num_workers=2)
        batches = list(loader)
        lens.append(len(batches))
        for x, y in batches:
            assert x.shape[1:] == (3, 32, 32)
            for v in y.tolist():
                if v >= 0:
                    per_class[v] += 1
    assert lens[0] == lens[1] and per_class == index.raw["splits"]["test"]["per_class"]


def test_cli(tree, tmp_path):
    r = subprocess.run([sys.executable, "-m", "shards.imagenet_r", "--src", tree, "--out", str(tmp_path / "cli"),
                        "--num-classes", "5", "--workers", "1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cli" / "index.json").exists()


def test_bad_image_cli_is_one_line_and_skip_bad_records_it(tmp_path):
    bad = str(tmp_path / "bad")
    make_tree(bad)
    victim = os.path.join(bad, WNIDS[1], "sketch_1.JPEG")
    open(victim, "wb").write(b"\xff\xd8 truncated")
    cmd = [sys.executable, "-m", "shards.imagenet_r", "--src", bad, "--out", str(tmp_path / "o"), "--num-classes", "5",
           "--workers", "2"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]  # besides the progress bar
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(errors) == 1 and errors[0].startswith("error: ") and "sketch_1.JPEG' is corrupt" in errors[0], r.stderr
    r = subprocess.run(cmd + ["--skip-bad"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "1 bad source file(s) left out" in r.stderr
    idx = json.load(open(tmp_path / "o" / "index.json"))
    skipped = idx["bad_samples"]["skipped"]
    assert [s["source"] for s in skipped] == [victim] and "corrupt" in skipped[0]["reason"]
    total = sum(idx["splits"][s]["num_samples"] for s in ("train", "test"))
    assert total == sum(SIZES) - 1
    ShardIndex.load(str(tmp_path / "o" / "index.json"), verify_checksums=True)


def test_nested_folders_in_a_class_folder_are_reported(tmp_path):
    src = str(tmp_path / "nested")
    make_tree(src)
    os.makedirs(os.path.join(src, WNIDS[3], "more"))
    Image.new("RGB", (30, 30)).save(os.path.join(src, WNIDS[3], "more", "hidden_image.jpg"))
    with pytest.raises(ValueError, match=r"hold sub-folders, which are not read: \['n01498041/more'\]"):
        convert(src, str(tmp_path / "o"))
