"""Helpers for the tests of the array-dataset converters (Animal-MNIST, Fashion-MNIST, MNIST); not a
test module itself. Each test writes a small fake copy of its package's file layout; these read
the shards back and run the converters' command lines."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import webdataset as wds
from PIL import Image

from sdlora_ds.data.index import ShardIndex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_images(n: int, seed: int) -> np.ndarray:
    """uint8 (n, 28, 28) noise: every image distinct, so pixels identify the source position."""
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def read_back(index_path: str) -> tuple[dict, dict[str, dict[str, tuple[int, np.ndarray]]]]:
    """(index, {split: {key: (class, pixels)}}), after ShardIndex.load checked every sha256."""
    ShardIndex.load(index_path, verify_checksums=True)
    idx = json.load(open(index_path))
    out: dict = {}
    for split, s in idx["splits"].items():
        got = out.setdefault(split, {})
        for sh in s["shards"]:
            for sample in wds.WebDataset(os.path.join(os.path.dirname(index_path), sh["path"]), shardshuffle=False):
                img = Image.open(io.BytesIO(sample["png"]))
                assert img.mode == "L" and img.size == (28, 28)  # lossless grayscale; transforms make RGB
                cls = int(sample["cls"])
                assert cls in sh["classes"]
                got[sample["__key__"]] = (cls, np.asarray(img))
    return idx, out


def position(key: str) -> int:
    """Source position encoded in a key f"{split}_{class:04d}_{position:05d}"."""
    return int(key.rsplit("_", 1)[1])


def run_module(module: str, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for k, v in (env_extra or {}).items():  # PYTHONPATH: prepended, so a fake package shadows an installed one
        env[k] = os.pathsep.join([v, env[k]]) if k == "PYTHONPATH" and env.get(k) else v
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, env=env)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, one 'error:' line on stderr naming every needle, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
