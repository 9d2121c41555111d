"""shards.domainnet on a generated copy of the DomainNet layout (domain folders + *_train.txt /
*_test.txt list files), including its oddities: missing listed files, inconsistent labels,
duplicates across splits, empty classes, malformed lines."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdlora_ds.data import ShardIndex
from shards.domainnet import convert_domainnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["aircraft_carrier", "The_Great_Wall_of_China", "teddy-bear"]
DOMS = ["clipart", "quickdraw", "real"]


def make_domainnet(root, seed=0, per=(3, 2), skip_class=None):
    """Every domain: per[0] train and per[1] test images of each class; lists per domain and split."""
    rng = np.random.default_rng(seed)
    for d in DOMS:
        lines = {"train": [], "test": []}
        for c, name in enumerate(CLASSES):
            if c == skip_class:
                continue
            for split, n in zip(("train", "test"), per):
                for i in range(n):
                    rel = f"{d}/{name}/{d}_{c:03d}_{split}{i:03d}.jpg"
                    os.makedirs(os.path.join(root, d, name), exist_ok=True)
                    w, h = (int(v) for v in rng.integers(20, 50, 2))
                    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(root, rel))
                    lines[split].append(f"{rel} {c}")
        for split, ls in lines.items():
            open(os.path.join(root, f"{d}_{split}.txt"), "w").write("\n".join(ls) + "\n")
    return root


def convert(src, out, **kw):
    return convert_domainnet(src, out, num_classes=len(CLASSES), progress=False, **kw)


def test_default_lists_all_domains_and_provenance(tmp_path):
    src = make_domainnet(str(tmp_path / "domainnet"))
    path = convert(src, str(tmp_path / "o"))
    idx = json.load(open(path))
    assert idx["dataset"] == "domainnet" and idx["class_names"] == CLASSES
    assert idx["splits"]["train"]["per_class"] == [9, 9, 9] and idx["splits"]["test"]["per_class"] == [6, 6, 6]
    info = idx["split_info"]
    assert [f["file"] for f in info["list_files"]["train"]] == [f"{d}_train.txt" for d in DOMS]
    assert info["list_files"]["test"][0]["lines"] == 6 and len(info["list_files"]["test"][0]["sha256"]) == 64
    assert info["domains"] == {"train": {d: 9 for d in DOMS}, "test": {d: 6 for d in DOMS}}
    assert ShardIndex.load(path, verify_checksums=True).num_classes == 3


def test_chosen_lists_and_keys_name_the_domain(tmp_path):
    import webdataset as wds
    src = make_domainnet(str(tmp_path / "dn"))
    out = str(tmp_path / "o")
    path = convert(src, out, train_lists=["real_train.txt"], test_lists=[os.path.join(src, "real_test.txt")])
    idx = json.load(open(path))
    assert idx["splits"]["train"]["num_samples"] == 9 and idx["split_info"]["domains"]["test"] == {"real": 6}
    keys = [s["__key__"] for sh in idx["splits"]["train"]["shards"]
            for s in wds.WebDataset(os.path.join(out, sh["path"]), shardshuffle=False)]
    assert "train_0001_real_001_train000" in keys  # split, class id, file stem (DomainNet's names the domain)


def test_missing_listed_files_are_named(tmp_path):
    src = make_domainnet(str(tmp_path / "dn"))
    os.remove(os.path.join(src, "quickdraw/teddy-bear/quickdraw_002_test001.jpg"))
    with pytest.raises(ValueError) as e:
        convert(src, str(tmp_path / "o"))
    msg = str(e.value)
    assert "1 image(s) listed in clipart_test.txt, quickdraw_test.txt, real_test.txt are missing" in msg
    assert "quickdraw/teddy-bear/quickdraw_002_test001.jpg" in msg


def _append(src, name, line):
    with open(os.path.join(src, name), "a") as f:
        f.write(line + "\n")


def test_inconsistent_labels_duplicates_and_bad_lines(tmp_path):
    src = make_domainnet(str(tmp_path / "a"))
    _append(src, "real_train.txt", "real/teddy-bear/real_002_train000.jpg 1")  # folder says class 2
    with pytest.raises(ValueError, match=r"inconsistent labels: real_train.txt:10: .* label 1, which "
                                         r"clipart_train.txt:4 gives to class 'The_Great_Wall_of_China'"):
        convert(src, str(tmp_path / "o"))
    src = make_domainnet(str(tmp_path / "b"))
    _append(src, "real_test.txt", "real/teddy-bear/real_002_train000.jpg 2")  # a train image in test
    with pytest.raises(ValueError, match=r"real_test.txt:7: 'real/teddy-bear/real_002_train000.jpg' is already "
                                         r"listed at real_train.txt:7"):
        convert(src, str(tmp_path / "o"))
    for bad, needle in [("real/x.jpg 0", "is not <domain>/<class>/<file>"), ("real/a/b.jpg zero", "not an integer"),
                        ("real/a/b.jpg 3", r"label 3 outside 0..2"), ("photo/a/b.jpg 0", "not a DomainNet domain"),
                        ("justonefield", "expected 'path label'")]:
        src = make_domainnet(str(tmp_path / f"c{abs(hash(bad))}"), per=(1, 1))
        _append(src, "clipart_train.txt", bad)
        with pytest.raises(ValueError, match=needle):
            convert(src, str(tmp_path / "o"))


def test_empty_class_is_an_error(tmp_path):
    src = make_domainnet(str(tmp_path / "dn"), per=(1, 1), skip_class=1)
    with pytest.raises(ValueError, match=r"1 class\(es\) of the list files have no image in any split: 1 "):
        convert(src, str(tmp_path / "o"))
    with pytest.raises(ValueError, match=r"no \*_train.txt list file"):
        convert(str(tmp_path), str(tmp_path / "o"))


def test_class_with_train_images_only_is_reported(tmp_path):
    src = make_domainnet(str(tmp_path / "dn"), per=(1, 1))
    for d in DOMS:  # drop class 0's test images from every test list
        p = os.path.join(src, f"{d}_test.txt")
        lines = [line for line in open(p).read().split("\n") if line and not line.endswith(" 0")]
        open(p, "w").write("\n".join(lines) + "\n")
    idx = json.load(open(convert(src, str(tmp_path / "o"))))
    assert idx["split_info"]["class_report"]["empty"] == {"test": ["aircraft_carrier"]}


def test_cli(tmp_path):
    src = make_domainnet(str(tmp_path / "dn"), per=(1, 1))
    r = subprocess.run([sys.executable, "-m", "shards.domainnet", "--src", src, "--out", str(tmp_path / "cli"),
                        "--num-classes", "3", "--workers", "1", "--test-lists", "sketch_test.txt"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "list file 'sketch_test.txt' does not exist" in r.stderr
    r = subprocess.run([sys.executable, "-m", "shards.domainnet", "--src", src, "--out", str(tmp_path / "cli"),
                        "--num-classes", "3", "--workers", "1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
