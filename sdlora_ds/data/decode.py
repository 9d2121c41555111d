"""GPU decode + augmentation (data.decode = "cuda"): workers read bytes, the GPU decodes them.

Split of the work:
- DataLoader worker (`EncodeForDevice` in transforms.py, the stream's transform): reads the JPEG header, draws the
  sample's geometry exactly as the CPU path does (`FastTransform.plan`: the reference's crop and
  flip draws from the per-sample seeded RNG), and passes the encoded bytes on with that plan
  (a 1-D uint8 tensor: 9 int32 plan fields, then the JPEG). A non-JPEG sample is transformed on
  the CPU (the fast path) and passed as a finished image. `collate_encoded` packs a batch into one
  flat byte tensor + offsets + plans (pinned and copied like any tensor batch).
- Main process (`DeviceDecoder`, applied by `DeviceDecodingLoader` around the DataLoader): one
  batched torchvision.io.decode_jpeg(device="cuda") call (nvjpeg), then per image the region crop,
  an antialiased resize in float32 on the device, center crop, flip, / 255 and normalisation.
  The output is (B, 3, S, S) float32 on the device; labels stay as the loader yields them.
The device part runs on the CPU too (device="cpu": the same code with CPU decode), which is how
the tests check it against the CPU path. data.decode = "cuda" without a CUDA device is an error
(`require_cuda`), never a silent CPU run. Workers never touch CUDA (they are forked).
"""
from __future__ import annotations

from typing import Optional

import torch
from torchvision.transforms.v2 import functional as F

# The worker half lives with the other transforms (build_transform returns it); imported here by its
# old address too.
from sdlora_ds.data.transforms import ENCODED_HEADER as _HEADER
from sdlora_ds.data.transforms import EncodeForDevice, FastTransform, Plan, collate_encoded  # noqa: F401


def require_cuda(field: str = "data.decode") -> None:
    if not torch.cuda.is_available():
        raise ValueError(f"config field '{field}' = 'cuda' but no CUDA device is visible (torch.cuda.is_available() "
                         f"is False); set {field} = 'cpu' on machines without a GPU")


class DeviceDecoder:
    """Main-process side: a collated batch -> float32 (B, 3, S, S) on `device`."""

    def __init__(self, cfg, train: bool, device: str = "cuda"):
        if str(device).startswith("cuda"):
            require_cuda()
        self.device = torch.device(device)
        self.cfg_size = cfg.image_size
        self.interp = FastTransform(cfg, train).interp
        self.mean = None if cfg.mean is None else torch.tensor(cfg.mean, device=self.device).view(3, 1, 1)
        self.std = None if cfg.std is None else torch.tensor(cfg.std, device=self.device).view(3, 1, 1)

    def __call__(self, batch: dict) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg
        s, n = self.cfg_size, int(batch["size"])
        out = torch.empty(n, 3, s, s, dtype=torch.float32, device=self.device)
        if len(batch["done_idx"]):
            out[batch["done_idx"].to(self.device)] = batch["done"].to(self.device, non_blocking=True)
        offs = batch["offsets"].tolist()
        if len(offs) > 1:
            flat = batch["encoded"]
            plans = [Plan(*flat[a:a + 4 * _HEADER].clone().view(torch.int32).tolist()) for a in offs[:-1]]
            datas = [flat[a + 4 * _HEADER:b] for a, b in zip(offs[:-1], offs[1:])]
            dev = "cuda" if self.device.type == "cuda" else "cpu"
            images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=dev)  # list of uint8 (3, H, W)
            for idx, img, p in zip(batch["encoded_idx"].tolist(), images, plans):
                out[idx] = self._augment(img.to(self.device), p)
        return out

    def _augment(self, img: torch.Tensor, p: Plan) -> torch.Tensor:
        """uint8 (3, H, W) -> float32 (3, S, S): the CPU path's steps, resampled in float32."""
        s = self.cfg_size
        x = img[:, p.top:p.top + p.height, p.left:p.left + p.width].unsqueeze(0).float()
        x = F.resize(x, [p.resize_h, p.resize_w], interpolation=self.interp, antialias=True)[0]
        x = x[:, p.crop_top:p.crop_top + s, p.crop_left:p.crop_left + s]
        if p.flip:
            x = x.flip(-1)
        x = x.clamp_(0, 255).round_().div_(255.0)  # the CPU path resamples in uint8: same rounding
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x


class DeviceDecodingLoader:
    """Wraps a DataLoader whose batches are collated encodings: yields (images on device, labels)."""

    def __init__(self, loader, decoder: DeviceDecoder):
        self.loader, self.decoder = loader, decoder

    def __iter__(self):
        for batch, labels in self.loader:
            yield self.decoder(batch), labels

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):  # dataset, num_workers, ...: the DataLoader's
        return getattr(self.loader, name)


def wrap_for_device(loader, cfg, train: bool, device: Optional[str] = None):
    """build_loader's last step: data.decode = 'cuda' -> decode on the GPU; otherwise the loader."""
    if cfg.decode != "cuda":
        return loader
    return DeviceDecodingLoader(loader, DeviceDecoder(cfg, train, device or "cuda"))
