"""Image transforms of SPEC section 1: the reference pipeline and the fast path the loader uses.

Reference (`build_reference_transform`, torchvision.transforms.v2 on a decoded PIL image):
  train: RandomResizedCrop(image_size, scale, ratio, interpolation) [+ RandomHorizontalFlip]
  test:  Resize(test_resize, interpolation) (shorter side) + CenterCrop(image_size)
  then:  ToTensor semantics (float32 in [0, 1], (3, S, S), grayscale/palette/alpha sources made RGB)
         [+ Normalize(mean, std) when data.mean is set; the reference feeds un-normalised inputs].

Fast path (`build_transform` -> `FastTransform`, data.decode = "cpu"): the same geometry from the
same random numbers, planned before decoding (`FastTransform.plan`): RandomResizedCrop's own
parameter sampler and the flip's torch.rand(1) are drawn in the reference's order, from the image
size in the JPEG header. Then
  1. a JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling, PIL `draft`) when the region
     to resample still covers the output size at that scale (train: the crop box >= S x S; test:
     the image >= its Resize size), otherwise at full size by torchvision.io.decode_jpeg (libjpeg-
     turbo too, straight into a tensor: no PIL image and no copy into numpy);
  2. only the crop region is taken, and resampled (torch's antialiased uint8 kernels, channels-last:
     the fastest layout for them) to the output size;
  3. flip, float / 255, normalisation, as in the reference.
The output follows the reference's distribution: the crop box and flip are identical given the
RNG; a full-size decode gives the reference's pixels up to resampling rounding; a reduced-scale
decode differs by resampling only (DCT-domain downscaling before the antialiased resize, and a
crop box rounded to the reduced grid: at most half a reduced pixel). tests/test_transforms.py
bounds both differences. Randomness comes from torch's global RNG; the loader seeds it per sample.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

_INTERP = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR,
           "nearest": v2.InterpolationMode.NEAREST}
_DRAFT_SCALES = (8, 4, 2)  # libjpeg's DCT scaling factors 1/8, 1/4, 1/2


class ToRGB:
    """PIL image of any mode -> RGB; a (1|3|4, H, W) tensor -> (3, H, W). Module-level so that
    DataLoader workers started with 'spawn' can pickle it."""

    def __call__(self, img):
        if isinstance(img, torch.Tensor):
            if img.shape[-3] == 1:
                return img.expand(*img.shape[:-3], 3, *img.shape[-2:]).clone()
            return img[..., :3, :, :]
        if img.mode != "RGB":
            return img.convert("RGB")
        return img

    def __repr__(self) -> str:
        return "ToRGB()"


def _interp(cfg) -> v2.InterpolationMode:
    if cfg.interpolation not in _INTERP:
        raise ValueError(f"config field 'data.interpolation' = {cfg.interpolation!r}; allowed: {sorted(_INTERP)}")
    return _INTERP[cfg.interpolation]


def _normalize_step(cfg):
    if cfg.mean is None:
        return None
    if cfg.std is None:
        raise ValueError("config field 'data.std' is null while data.mean is set; give both or neither")
    return v2.Normalize(mean=list(cfg.mean), std=list(cfg.std))


def build_reference_transform(cfg, train: bool) -> v2.Compose:
    """cfg: sdlora_ds.config.DataConfig. PIL image -> float32 (3, S, S): the SPEC's definition."""
    interp = _interp(cfg)
    steps: list = [ToRGB(), v2.ToImage()]  # PIL -> uint8 (3, H, W) tensor
    if train:
        steps.append(v2.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.train_scale),
                                          ratio=tuple(cfg.train_ratio), interpolation=interp, antialias=True))
        if cfg.hflip:
            steps.append(v2.RandomHorizontalFlip())
    else:
        steps += [v2.Resize(cfg.test_resize, interpolation=interp, antialias=True),
                  v2.CenterCrop(cfg.image_size)]
    steps.append(v2.ToDtype(torch.float32, scale=True))  # ToTensor semantics: uint8 -> float32 / 255
    norm = _normalize_step(cfg)
    if norm is not None:
        steps.append(norm)
    steps.append(v2.ToPureTensor())  # a plain torch.Tensor, not a tv_tensors.Image subclass
    return v2.Compose(steps)


@dataclass(frozen=True)
class Plan:
    """Where the output comes from, in source pixels: the region (top, left, height, width) is
    resampled to (resize_h, resize_w), of which (crop_top, crop_left, S, S) is kept, then flipped."""
    top: int
    left: int
    height: int
    width: int
    resize_h: int
    resize_w: int
    crop_top: int
    crop_left: int
    flip: bool

    def draft_scale(self) -> int:
        """Largest DCT scale k in (8, 4, 2) at which the region still covers its resampled size."""
        for k in _DRAFT_SCALES:
            if self.width / k >= self.resize_w and self.height / k >= self.resize_h:
                return k
        return 1


def resized_size(w: int, h: int, short: int) -> tuple[int, int]:
    """(height, width) of v2.Resize(short) on a (w, h) image: shorter side -> short, the longer
    int(short * long / shorter), as torchvision computes it."""
    if w <= h:
        return int(short * h / w), short
    return short, int(short * w / h)


class FastTransform:
    """bytes (or a PIL image) -> float32 (3, S, S); see the module docstring. Picklable."""

    def __init__(self, cfg, train: bool, draft: bool = True):
        self.train, self.size, self.draft = train, cfg.image_size, draft
        self.interp = _interp(cfg)
        self.test_resize = cfg.test_resize
        self.hflip = bool(cfg.hflip) and train
        # the reference's own parameter sampler: the same random draws as RandomResizedCrop
        self.rrc = v2.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.train_scale), ratio=tuple(cfg.train_ratio),
                                        interpolation=self.interp, antialias=True)
        self.normalize = _normalize_step(cfg)

    # ------------------------------------------------------------------ geometry (no pixels)
    def plan(self, w: int, h: int) -> Plan:
        """The geometry for a (w, h) source, drawing from torch's RNG exactly as the reference."""
        s = self.size
        if self.train:
            p = self.rrc.make_params([torch.empty(()).expand(1, h, w)])  # only its size is read
            flip = bool(torch.rand(1) < 0.5) if self.hflip else False  # RandomHorizontalFlip(p=0.5)
            return Plan(p["top"], p["left"], p["height"], p["width"], s, s, 0, 0, flip)
        rh, rw = resized_size(w, h, self.test_resize)
        return Plan(0, 0, h, w, rh, rw, int(round((rh - s) / 2.0)), int(round((rw - s) / 2.0)), False)

    # ------------------------------------------------------------------ pixels
    def __call__(self, src) -> torch.Tensor:
        from PIL import Image
        if isinstance(src, (bytes, bytearray, memoryview)):
            data = bytes(src)
            size = jpeg_size(data)
            if size is not None:  # a JPEG: its size from the frame header, no PIL parse yet
                plan = self.plan(*size)
                k = plan.draft_scale() if self.draft else 1
                if k == 1:
                    return self.finish(_decode_jpeg_region(data, plan), plan)
                return self.finish(_pil_region(Image.open(io.BytesIO(data)), plan, k), plan)
            img = Image.open(io.BytesIO(data))  # other formats: reads the header only
        else:
            img = src
        plan = self.plan(*img.size)
        k = plan.draft_scale() if self.draft and img.format == "JPEG" else 1
        return self.finish(_pil_region(img, plan, k), plan)

    def finish(self, x: torch.Tensor, plan: Plan) -> torch.Tensor:
        """uint8 (C, h, w) region (C = 1 or 3) -> float32 (3, S, S): resample, crop, flip, scale."""
        x = x.unsqueeze(0).contiguous(memory_format=torch.channels_last)  # fastest for uint8 resampling
        x = F.resize(x, [plan.resize_h, plan.resize_w], interpolation=self.interp, antialias=True)[0]
        s = self.size
        x = x[:, plan.crop_top:plan.crop_top + s, plan.crop_left:plan.crop_left + s]
        if plan.flip:
            x = x.flip(-1)
        if x.shape[0] == 1:
            x = x.expand(3, s, s)
        x = x.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
        if self.normalize is not None:
            x = self.normalize(x)
        return x


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_size(data: bytes):
    """(width, height) from a JPEG's frame header (SOFn marker), or None when data is not a JPEG
    or the header is not where the JPEG syntax puts it (the caller then asks PIL)."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF:
            h, w = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            return (w, h) if w > 0 and h > 0 else None
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _decode_jpeg_region(data: bytes, plan: Plan) -> torch.Tensor:
    """Full-size libjpeg-turbo decode into a (3, H, W) tensor; the region as a view."""
    from torchvision.io import ImageReadMode, decode_jpeg
    x = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return x[:, plan.top:plan.top + plan.height, plan.left:plan.left + plan.width]


def _pil_region(img, plan: Plan, k: int) -> torch.Tensor:
    """Decode with PIL (at 1/k scale for a JPEG when k > 1) and return the region, uint8 (C, h, w)."""
    w0, h0 = img.size
    if k > 1:
        img.draft("RGB", (w0 // k, h0 // k))  # DCT scaling: the decoder picks 1/k, size ceil(w0 / k)
    img.load()
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    w1, h1 = img.size
    rx, ry = w1 / w0, h1 / h0
    x0, y0 = min(round(plan.left * rx), w1 - 1), min(round(plan.top * ry), h1 - 1)
    x1 = max(x0 + 1, min(w1, round((plan.left + plan.width) * rx)))
    y1 = max(y0 + 1, min(h1, round((plan.top + plan.height) * ry)))
    if (x0, y0, x1, y1) != (0, 0, w1, h1):
        img = img.crop((x0, y0, x1, y1))
    a = np.asarray(img)
    t = torch.from_numpy(a.copy() if not a.flags.writeable else a)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


def build_transform(cfg, train: bool):
    """The loader's transform: bytes or PIL image -> float32 (3, S, S) (data.decode "cpu": the fast
    path; "reference": the v2 pipeline on a fully decoded PIL image; "cuda": the encoded sample and
    its plan, decoded later on the GPU)."""
    decode = getattr(cfg, "decode", "cpu")
    if decode == "reference":
        return _DecodeThen(build_reference_transform(cfg, train))
    if decode == "cuda":  # the worker half of the GPU path: geometry + bytes (decoded by sdlora_ds/data/decode.py)
        return EncodeForDevice(cfg, train)
    return FastTransform(cfg, train)


class _DecodeThen:
    """bytes or PIL image -> the reference pipeline on the fully decoded image."""

    def __init__(self, ref: v2.Compose):
        self.ref = ref
        self.transforms = ref.transforms

    def __call__(self, src) -> torch.Tensor:
        from PIL import Image
        if isinstance(src, (bytes, bytearray, memoryview)):
            with Image.open(io.BytesIO(bytes(src))) as img:
                img.load()
                return self.ref(img)
        return self.ref(src)


ENCODED_HEADER = 9  # int32 plan fields before the JPEG bytes


class EncodeForDevice:
    """Worker side: bytes -> 1-D uint8 (plan header + JPEG bytes), or float32 (3, S, S) for non-JPEG."""

    def __init__(self, cfg, train: bool):
        self.cpu = FastTransform(cfg, train)

    def __call__(self, src) -> torch.Tensor:
        from PIL import Image
        if not isinstance(src, (bytes, bytearray, memoryview)):
            return self.cpu(src)
        data = bytes(src)
        img = Image.open(io.BytesIO(data))  # header only
        if img.format != "JPEG":
            return self.cpu(img)
        p = self.cpu.plan(*img.size)
        head = torch.tensor([p.top, p.left, p.height, p.width, p.resize_h, p.resize_w, p.crop_top, p.crop_left,
                             int(p.flip)], dtype=torch.int32).view(torch.uint8)
        return torch.cat([head, torch.frombuffer(bytearray(data), dtype=torch.uint8)])

    @staticmethod
    def collate(items: list) -> dict:
        return collate_encoded(items)


def collate_encoded(items: list) -> dict:
    """items: 1-D uint8 (encoded) or float (3, S, S) (finished) -> one dict of tensors for the batch."""
    enc = [i for i, x in enumerate(items) if x.dtype == torch.uint8 and x.ndim == 1]
    done = [i for i in range(len(items)) if i not in set(enc)]
    lengths = torch.tensor([items[i].numel() for i in enc], dtype=torch.int64)
    offsets = torch.zeros(len(enc) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    return {"size": torch.tensor(len(items)), "encoded_idx": torch.tensor(enc, dtype=torch.int64),
            "encoded": torch.cat([items[i] for i in enc]) if enc else torch.zeros(0, dtype=torch.uint8),
            "offsets": offsets, "done_idx": torch.tensor(done, dtype=torch.int64),
            "done": torch.stack([items[i] for i in done]) if done else torch.zeros(0)}


__all__ = ["ToRGB", "Plan", "FastTransform", "build_transform", "build_reference_transform", "resized_size",
           "EncodeForDevice", "collate_encoded", "ENCODED_HEADER"]
