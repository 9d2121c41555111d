"""sdlora_ds.data.transforms: the SPEC pipelines (reference) and the fast path the loader uses,
which must give the reference's distribution: same crop and flip from the same RNG, the same pixels
at full-size decode, and a bounded resampling difference at reduced-scale (DCT) decode."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from sdlora_ds.config import DataConfig
from sdlora_ds.data import build_transform
from sdlora_ds.data.transforms import FastTransform, build_reference_transform, resized_size


def rgb(w=300, h=200, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def photo(w, h, seed=0, noise=6, fmt="JPEG", mode="RGB"):
    """Encoded photo-like image: a smooth random field plus mild noise."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8))
    arr = np.asarray(small.resize((w, h), Image.BICUBIC)).astype(np.int16) + rng.integers(-noise, noise + 1, (h, w, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def both(cfg, train, data, seed):
    """(fast output, reference output, plan) from the same RNG state."""
    fast, ref = FastTransform(cfg, train), build_reference_transform(cfg, train)
    torch.manual_seed(seed)
    plan = fast.plan(*Image.open(io.BytesIO(data)).size)
    torch.manual_seed(seed)
    a = fast(data)
    torch.manual_seed(seed)
    b = ref(Image.open(io.BytesIO(data)))
    return a, b, plan


def test_reference_train_pipeline_matches_spec():
    cfg = DataConfig(index="x")
    t = build_reference_transform(cfg, train=True)
    rrc = next(s for s in t.transforms if isinstance(s, v2.RandomResizedCrop))
    assert tuple(rrc.size) == (224, 224) and rrc.scale == (0.05, 1.0) and rrc.ratio == pytest.approx((0.75, 4 / 3))
    assert rrc.interpolation == v2.InterpolationMode.BICUBIC
    assert any(isinstance(s, v2.RandomHorizontalFlip) for s in t.transforms)
    assert not any(isinstance(s, v2.Normalize) for s in t.transforms)
    for x in (t(rgb()), build_transform(cfg, train=True)(rgb())):
        assert type(x) is torch.Tensor and x.shape == (3, 224, 224) and x.dtype == torch.float32
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    no_flip = build_reference_transform(DataConfig(index="x", hflip=False, interpolation="bilinear"), train=True)
    assert not any(isinstance(s, v2.RandomHorizontalFlip) for s in no_flip.transforms)


def test_test_pipeline_is_resize_centercrop_totensor():
    cfg = DataConfig(index="x", image_size=224, test_resize=256)
    img = rgb(300, 200)
    ref = img.resize((384, 256), Image.BICUBIC)  # shorter side -> 256 (bicubic), center crop 224, ToTensor
    left, top = (384 - 224) // 2, (256 - 224) // 2
    ref = torch.from_numpy(np.array(ref.crop((left, top, left + 224, top + 224)))).permute(2, 0, 1) / 255.0
    for t in (build_transform(cfg, train=False), build_reference_transform(cfg, train=False)):
        x = t(img)
        assert x.shape == (3, 224, 224)
        assert (x - ref).abs().mean() < 0.01  # PIL vs torchvision resampling differ by rounding only
        assert torch.equal(x, t(img))  # deterministic
    for w, h in [(300, 200), (200, 301), (256, 256), (1000, 333)]:
        assert resized_size(w, h, 256) == tuple(F.resize(torch.zeros(1, h, w), [256]).shape[-2:])


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("size", [(37, 29), (300, 200), (640, 480)])
def test_same_geometry_and_pixels_as_reference_at_full_size(train, size):
    """PNG (decoded by PIL in both) and small JPEGs (no DCT scaling possible): the fast path gives
    the reference's output up to uint8 resampling rounding, for every seed, crop and flip."""
    cfg = DataConfig(index="x", image_size=32 if size[0] < 100 else 224, test_resize=36 if size[0] < 100 else 256)
    for fmt in ("PNG", "JPEG"):
        data = photo(*size, fmt=fmt)
        for seed in range(8):
            a, b, plan = both(cfg, train, data, seed)
            if plan.draft_scale() > 1 and fmt == "JPEG":
                continue  # reduced-scale decode: bounded in the next test
            assert a.shape == b.shape == (3, cfg.image_size, cfg.image_size)
            assert (a - b).abs().max() <= 1.01 / 255, (fmt, seed, plan)


def test_crop_parameters_are_the_reference_draws():
    """plan() consumes torch's RNG exactly like RandomResizedCrop + RandomHorizontalFlip."""
    cfg = DataConfig(index="x", train_scale=[0.08, 1.0])
    fast = FastTransform(cfg, True)
    ref = build_reference_transform(cfg, True).transforms
    rrc = next(s for s in ref if isinstance(s, v2.RandomResizedCrop))
    for seed in range(50):
        torch.manual_seed(seed)
        p = fast.plan(640, 480)
        after_fast = torch.rand(1)
        torch.manual_seed(seed)
        q = rrc.make_params([torch.zeros(3, 480, 640)])
        flip = bool(torch.rand(1) < 0.5)
        assert (p.top, p.left, p.height, p.width, p.flip) == (q["top"], q["left"], q["height"], q["width"], flip)
        assert torch.equal(after_fast, torch.rand(1))  # same number of draws


def test_dct_scaled_decode_differs_by_resampling_only():
    """Large JPEGs: the region is decoded at 1/k scale when it still covers the output. (a) On the
    same crop box (the fast path's box on the 1/k grid), fast vs reference differ by resampling:
    mean |d| < 1.5/255. (b) From the same seed (the box rounded by <= k/2 source pixels): images
    stay alike and per-image statistics agree."""
    cfg = DataConfig(index="x")
    fast = FastTransform(cfg, True)
    data = photo(900, 700, seed=3)
    full = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
    scaled = 0
    for seed in range(24):
        a, b, plan = both(cfg, True, data, seed)
        k = plan.draft_scale()
        if k == 1:
            assert torch.equal(a, b) or (a - b).abs().max() <= 1.01 / 255
            continue
        scaled += 1
        assert plan.width / k >= 224 and plan.height / k >= 224  # the region still covers the output
        x0, y0 = round(plan.left / k) * k, round(plan.top / k) * k
        x1, y1 = round((plan.left + plan.width) / k) * k, round((plan.top + plan.height) / k) * k
        same_box = F.resized_crop(full, y0, x0, y1 - y0, x1 - x0, [224, 224],
                                  interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        same_box = (same_box.flip(-1) if plan.flip else same_box).float() / 255
        assert (a - same_box).abs().mean() < 1.5 / 255 and (a - same_box).abs().max() < 12 / 255
        assert (a - b).abs().mean() < 10 / 255
        assert (a.mean((1, 2)) - b.mean((1, 2))).abs().max() < 1 / 255
        assert (a.std((1, 2)) - b.std((1, 2))).abs().max() < 3 / 255
    assert scaled >= 8  # the test exercised the scaled decode
    # test transform: 900x700 -> decoded at 1/2 (450x350 >= the 329x256 Resize)
    a, b, plan = both(cfg, False, data, 0)
    assert plan.draft_scale() == 2 and (a - b).abs().mean() < 1.5 / 255 and (a - b).abs().max() < 12 / 255


def test_draft_off_is_full_decode():
    cfg = DataConfig(index="x")
    data = photo(900, 700, seed=1)
    torch.manual_seed(5)
    a = FastTransform(cfg, True, draft=False)(data)
    torch.manual_seed(5)
    b = build_reference_transform(cfg, True)(Image.open(io.BytesIO(data)))
    assert (a - b).abs().max() <= 1.01 / 255


def test_grayscale_palette_and_rgba_become_rgb():
    cfg = DataConfig(index="x", image_size=32, test_resize=32)
    gray = Image.fromarray(np.full((8, 8), 128, np.uint8))
    for train in (True, False):
        for t in (build_transform(cfg, train), build_reference_transform(cfg, train)):
            x = t(gray)
            assert x.shape == (3, 32, 32)
            assert torch.allclose(x, torch.full_like(x, 128 / 255), atol=1e-6)
    rgba = Image.new("RGBA", (40, 40), (10, 20, 30, 0))
    assert build_transform(cfg, False)(rgba).shape == (3, 32, 32)
    for mode, fmt in (("L", "JPEG"), ("P", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG")):
        data = photo(64, 48, fmt=fmt, mode=mode)
        for train in (True, False):
            a, b, _ = both(cfg, train, data, 1)
            assert a.shape == (3, 32, 32) and (a - b).abs().max() <= 1.01 / 255, (mode, train)


def test_normalisation_only_when_mean_set():
    img = Image.new("RGB", (64, 64), (255, 0, 51))
    plain = build_transform(DataConfig(index="x", image_size=32, test_resize=32), False)(img)
    cfg = DataConfig(index="x", image_size=32, test_resize=32, mean=[0.5, 0.5, 0.5], std=[0.5, 0.25, 0.2])
    for t in (build_transform(cfg, False), build_reference_transform(cfg, False)):
        normed = t(img)
        assert torch.allclose(normed[0], torch.ones(32, 32)) and torch.allclose(normed[1], torch.full((32, 32), -2.0))
        assert torch.allclose(normed[2], (plain[2] - 0.5) / 0.2)


def test_corrupt_bytes_raise():
    cfg = DataConfig(index="x")
    good = photo(300, 200)
    for bad in (good[:200], b"\xff\xd8 not a jpeg", b"nothing"):
        with pytest.raises(Exception):
            build_transform(cfg, True)(bad)


def test_jpeg_size_from_frame_header():
    from sdlora_ds.data.transforms import jpeg_size
    img = rgb(123, 45)
    exif = Image.Exif()
    exif[0x0112] = 1  # an APP1 segment before the frame header
    for kw in ({}, {"progressive": True}, {"exif": exif, "icc_profile": b"\0" * 3000},
               {"quality": 50, "subsampling": 0}):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", **kw)
        assert jpeg_size(buf.getvalue()) == (123, 45), kw
    png = io.BytesIO()
    img.save(png, format="PNG")
    assert jpeg_size(png.getvalue()) is None and jpeg_size(b"\xff\xd8\xff") is None
    assert jpeg_size(b"\xff\xd8" + b"\x00" * 20) is None  # not a marker where one must be
