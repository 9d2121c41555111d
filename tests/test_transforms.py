"""sdlora_ds.data.transforms: SPEC section 1 pipelines built from DataConfig."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from sdlora_ds.config import DataConfig
from sdlora_ds.data import build_transform


def rgb(w=300, h=200, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_train_pipeline_matches_spec():
    cfg = DataConfig(index="x")
    t = build_transform(cfg, train=True)
    rrc = next(s for s in t.transforms if isinstance(s, v2.RandomResizedCrop))
    assert tuple(rrc.size) == (224, 224) and rrc.scale == (0.05, 1.0) and rrc.ratio == pytest.approx((0.75, 4 / 3))
    assert rrc.interpolation == v2.InterpolationMode.BICUBIC
    assert any(isinstance(s, v2.RandomHorizontalFlip) for s in t.transforms)
    assert not any(isinstance(s, v2.Normalize) for s in t.transforms)
    x = t(rgb())
    assert type(x) is torch.Tensor and x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    no_flip = build_transform(DataConfig(index="x", hflip=False, interpolation="bilinear"), train=True)
    assert not any(isinstance(s, v2.RandomHorizontalFlip) for s in no_flip.transforms)


def test_test_pipeline_is_resize_centercrop_totensor():
    cfg = DataConfig(index="x", image_size=224, test_resize=256)
    img = rgb(300, 200)
    x = build_transform(cfg, train=False)(img)
    # reference: shorter side -> 256 (bicubic), center crop 224, ToTensor semantics
    ref = img.resize((384, 256), Image.BICUBIC)
    left, top = (384 - 224) // 2, (256 - 224) // 2
    ref = torch.from_numpy(np.array(ref.crop((left, top, left + 224, top + 224)))).permute(2, 0, 1) / 255.0
    assert x.shape == (3, 224, 224)
    assert (x - ref).abs().mean() < 0.01  # PIL vs torchvision resampling differ by rounding only
    assert torch.equal(x, build_transform(cfg, train=False)(img))  # deterministic


def test_grayscale_and_rgba_become_rgb():
    cfg = DataConfig(index="x", image_size=32, test_resize=32)
    gray = Image.fromarray(np.full((8, 8), 128, np.uint8))
    for train in (True, False):
        x = build_transform(cfg, train)(gray)
        assert x.shape == (3, 32, 32)
        assert torch.allclose(x, torch.full_like(x, 128 / 255), atol=1e-6)
    rgba = Image.new("RGBA", (40, 40), (10, 20, 30, 0))
    assert build_transform(cfg, False)(rgba).shape == (3, 32, 32)


def test_normalisation_only_when_mean_set():
    img = Image.new("RGB", (64, 64), (255, 0, 51))
    plain = build_transform(DataConfig(index="x", image_size=32, test_resize=32), False)(img)
    cfg = DataConfig(index="x", image_size=32, test_resize=32, mean=[0.5, 0.5, 0.5], std=[0.5, 0.25, 0.2])
    normed = build_transform(cfg, False)(img)
    assert torch.allclose(normed[0], torch.ones(32, 32)) and torch.allclose(normed[1], torch.full((32, 32), -2.0))
    assert torch.allclose(normed[2], (plain[2] - 0.5) / 0.2)
