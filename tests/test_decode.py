"""sdlora_ds.data.decode: the GPU decode path's CPU-checkable parts (worker-side plans, packing,
the device-side decode run with device='cpu') against the CPU path, and the clear error without CUDA."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora_ds.config import DataConfig
from sdlora_ds.data import ShardIndex, build_loader
from sdlora_ds.data.decode import DeviceDecoder, EncodeForDevice, collate_encoded
from sdlora_ds.data.transforms import FastTransform
from shards.writer import SampleSpec, finish_conversion

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")


def photo(w, h, seed, fmt="JPEG"):
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("train", [True, False])
def test_device_path_on_cpu_matches_cpu_path(train):
    cfg = DataConfig(index="x", image_size=64, test_resize=72, mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2])
    datas = [photo(120, 90, 0), photo(80, 100, 1), photo(300, 260, 2), photo(70, 70, 3, fmt="PNG")]
    enc, cpu = EncodeForDevice(cfg, train), FastTransform(cfg, train, draft=False)
    items, want = [], []
    for i, d in enumerate(datas):
        torch.manual_seed(i)
        items.append(enc(d))
        torch.manual_seed(i)
        want.append(cpu(d))
    assert [x.dtype for x in items] == [torch.uint8] * 3 + [torch.float32]  # the PNG is finished on the CPU
    items.append(torch.zeros(3, 64, 64))  # eval padding passes through
    batch = collate_encoded(items)
    got = DeviceDecoder(cfg, train, device="cpu")(batch)
    assert got.shape == (5, 3, 64, 64) and got.dtype == torch.float32
    assert torch.equal(got[3], want[3]) and torch.equal(got[4], torch.zeros(3, 64, 64))
    for i in range(3):  # float vs uint8 resampling, then the same rounding: <= 1 grey level
        assert (got[i] - want[i]).abs().max() <= 1.01 / 255 / 0.2, i


@no_cuda
def test_cuda_requested_without_cuda_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"'data.decode' = 'cuda' but no CUDA device .* set data.decode = 'cpu'"):
        DeviceDecoder(DataConfig(index="x"), True)
    path = _shards(tmp_path)
    cfg = DataConfig(index=path, image_size=32, test_resize=32, decode="cuda")
    with pytest.raises(ValueError, match="no CUDA device"):
        build_loader(ShardIndex.load(path), cfg, split="train", class_ids=[0, 1], train=True, batch_size=4,
                     rank=0, world_size=1, seed=0)


def _shards(tmp_path):
    samples = {"train": [SampleSpec(f"train_{c:04d}_{i:03d}", c, ("jpg", photo(90 + 7 * i, 70 + 5 * c, 10 * c + i)),
                                    f"gen{c}{i}") for c in range(2) for i in range(5)]}
    return finish_conversion(str(tmp_path / "s"), "gen", ["a", "b"], samples, _encode_pair, {}, {"method": "gen"},
                             {"converter": "tests"}, max_per_shard=4, progress=False)


def _encode_pair(src, options):
    return src


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_with_device_decode_matches_cpu_decode(tmp_path, monkeypatch, workers):
    """The whole plumbing (worker encodes, collate, wrapper decodes) with the device part on the CPU."""
    import sdlora_ds.data.decode as D
    import sdlora_ds.data.loader as L
    path = _shards(tmp_path)
    index = ShardIndex.load(path)
    kw = dict(split="train", class_ids=[0, 1], train=True, batch_size=3, rank=0, world_size=1, seed=4,
              num_workers=workers)
    base = dict(index=path, image_size=64, test_resize=64, train_scale=[0.3, 1.0])  # crops < 128: no DCT scaling
    want = list(build_loader(index, DataConfig(**base), **kw))
    monkeypatch.setattr(L, "require_cuda", lambda *a: None)
    monkeypatch.setattr(L, "wrap_for_device", lambda loader, cfg, train: D.DeviceDecodingLoader(
        loader, D.DeviceDecoder(cfg, train, device="cpu")))
    loader = build_loader(index, DataConfig(**base, decode="cuda"), **kw)
    got = list(loader)
    assert len(got) == len(loader) == len(want) == 4
    for (x, y), (xw, yw) in zip(got, want):
        assert torch.equal(y, yw) and x.shape == xw.shape
        assert (x - xw).abs().max() <= 1.01 / 255  # same crops and flips; float vs uint8 resampling
