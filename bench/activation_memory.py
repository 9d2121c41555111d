"""Peak memory of one SD-LoRA training step with and without activation checkpointing, measured on CPU,
beside the memory plan's activation estimate (sdlora_ds/plan.py).

For each setting, one process builds the project's SDLoRAModel at the named backbone's width (the
shapes of configs/imagenetr_b40_vitl16.json or imagenetr_b40_dinov2_g14.json; --depth keeps the first
N blocks), starts every task of the config (5 tasks, rank 10: the last task has the most frozen
directions) and runs one forward + backward in fp32 on random images. Measured: the peak bytes of the
tensors created during the step and alive at once (LivePeak: every op's output storage is counted
until Python frees it; the weights and buffers that existed before are not counted, even when an op
returns a view of them). CPU has no allocator statistics, and this counts what the step adds, not
the allocator's caching or fragmentation (a GPU adds those). Also measured: the bytes autograd saves
for the backward (saved_tensors_hooks), which the plan's per-block formula counts.

    python bench/activation_memory.py --backbone vit_l16 --depth 4 --image-size 224 --batch 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


class LivePeak(TorchDispatchMode):
    """Peak bytes of the tensor storages created while it is active and alive at once. on_peak: called
    with no argument each time the peak rises (to see what the peak is made of at that moment)."""

    def __init__(self, existing: set, on_peak=None):
        super().__init__()
        self.existing, self.live, self.now, self.peak, self.on_peak = existing, {}, 0, 0, on_peak

    def _free(self, key):
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                key = s.data_ptr()
                if key and key not in self.live and key not in self.existing:
                    self.live[key] = s.nbytes()
                    self.now += s.nbytes()
                    if self.now > self.peak:
                        self.peak = self.now
                        if self.on_peak is not None:
                            self.on_peak()
                    weakref.finalize(s, self._free, key)
        return out


def measured_step(cfg, micro: int, seed: int = 0, dtype=torch.float32) -> tuple:
    """(peak bytes the step allocates, bytes autograd saves) of one forward + backward at the last task;
    dtype bfloat16: the whole model in bf16, as DeepSpeed's bf16 mode runs it."""
    from sdlora_ds.model import SDLoRAModel
    torch.manual_seed(seed)
    m = SDLoRAModel(cfg)
    for t in range(cfg.cil.num_tasks):
        m.start_task(t, cfg.cil.init_classes if t == 0 else cfg.cil.increment)
    m.set_trainable()
    m.train()
    m.to(dtype)
    size = cfg.data.image_size
    x, y = torch.rand(micro, 3, size, size, dtype=dtype), torch.randint(0, m.task_sizes[-1], (micro,))
    existing = {t.untyped_storage().data_ptr() for t in list(m.parameters()) + list(m.buffers())}
    saved = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in existing:
            saved[key] = t.untyped_storage().nbytes()
        return t
    with LivePeak(existing) as live:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(m(x)[:, m.known_classes:].float(), y)
        loss.backward()
    return live.peak, sum(saved.values())


def run_config(backbone: str, depth, image_size: int, batch: int, checkpointing: bool):
    from sdlora_ds.config import config_from_dict
    from zero_memory import backbone_fields
    raw = {"backbone": backbone_fields(backbone, depth, image_size), "adapter": {"rank": 10},
           "cil": {"num_classes": 200, "init_classes": 40, "increment": 40, "num_tasks": 5},
           "data": {"index": "unused", "image_size": image_size, "test_resize": image_size},
           "optim": {"global_batch": batch}, "dist": {"mixed_precision": "no"},
           "train": {"activation_checkpointing": checkpointing}}
    return config_from_dict(raw)


def main(argv=None) -> int:
    from zero_memory import BACKBONES
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", choices=sorted(BACKBONES), default="vit_l16")
    ap.add_argument("--depth", type=int, default=4, help="keep the first N blocks (full width)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args(argv)
    from sdlora_ds.plan import activation_bytes, architecture
    torch.set_num_threads(1)
    rows = []
    for ckpt in (False, True):
        cfg = run_config(args.backbone, args.depth, args.image_size, args.batch, ckpt)
        peak, saved = measured_step(cfg, args.batch)
        est = activation_bytes(cfg, architecture(cfg), args.batch)
        rows.append({"checkpointing": ckpt, "peak": peak, "saved": saved, "plan_total": est["total"],
                     "plan_kept": est["kept"], "plan_over_peak": est["total"] / peak})
    a = architecture(cfg)
    print(f"SD-LoRA on {args.backbone} width {a.hidden}, {a.layers} blocks, {a.tokens} tokens ({args.image_size} px), "
          f"batch {args.batch}, last of 5 tasks, fp32 CPU; MiB")
    print(f"{'checkpointing':>13} {'measured peak':>13} {'plan':>9} {'plan/peak':>9} {'saved':>9}")
    for r in rows:
        print(f"{str(r['checkpointing']):>13} {r['peak'] / MiB:>13.1f} {r['plan_total'] / MiB:>9.1f} "
              f"{r['plan_over_peak']:>9.3f} {r['saved'] / MiB:>9.1f}")
    print(f"checkpointing / without, measured peak: {rows[1]['peak'] / rows[0]['peak']:.3f}")
    print(json.dumps({"bench": "activation_memory", "backbone": args.backbone, "depth": a.layers,
                      "image_size": args.image_size, "batch": args.batch, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
