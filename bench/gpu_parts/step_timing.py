"""step_timing part: a full training step at ViT-B/16 size for T = 1, 5, 20, 50 (ours with the Triton and
the reference impl, the per-task loop, the frozen backbone), interleaved rounds, peak memory per T.

"frozen" = the plain ViT (no adapter) with every weight frozen; only the biases of the adapted
q/v projections take a gradient (a sum over tokens each), so its backward walks the same graph as
SD-LoRA's (down to block 0's q/v outputs) without any low-rank work: the floor of any q/v adapter.
"""
from __future__ import annotations

import argparse

from .common import on_cuda


def part_step_timing(ctx) -> dict:
    import torch
    from torch import nn
    import train_step as TS
    from sdlora_ds.model import build_backbone
    from sdlora_ds.model.backbone import cls_features, find_targets

    s, dev, cuda = ctx["sizes"], ctx["device"], on_cuda(ctx)
    args = argparse.Namespace(d=s["d"], layers=s["layers"], heads=s["heads"], image_size=s["image"], rank=s["rank"],
                              impl="auto", classes_per_task=s["cpt"], tasks=s["tasks"])
    cfg = TS.make_cfg(args)
    amp = torch.bfloat16 if cuda else None
    g = torch.Generator().manual_seed(0)
    batch = (torch.rand(s["batch"], 3, s["image"], s["image"], generator=g),
             torch.randint(0, s["cpt"], (s["batch"],), generator=g))
    impls = ["triton", "reference"] if cuda else ["reference"]
    skipped = {} if cuda else {"ours_triton": "the Triton path needs CUDA (on CPU only the interpreter runs it)",
                               "peak_memory": "CUDA allocator statistics only (no GPU)"}

    class ImplRunner:  # the same model stepped through another adapter.impl
        def __init__(self, model, impl, runner):
            self.model, self.impl, self.runner = model, impl, runner

        def step(self):
            for layer in self.model.layers:
                layer.impl = self.impl
            self.runner.step()

    class Frozen(nn.Module):  # plain ViT + head; only the q/v biases take a gradient (see module doc)
        def __init__(self):
            super().__init__()
            self.backbone = build_backbone(cfg.backbone).requires_grad_(False)
            self.head = nn.Linear(s["d"], s["cpt"])
            self.qv_bias = [lin.bias.requires_grad_(True) for *_, lin in
                            find_targets(self.backbone, cfg.adapter.target_modules)]

        def forward(self, x):
            return self.head(cls_features(self.backbone, x))

    runners = {}
    for t in s["tasks"]:
        torch.manual_seed(0)
        ours = TS.build_ours(cfg, t, s["cpt"], dev)
        for impl in impls:
            runners[(f"ours_{impl}", t)] = ImplRunner(
                ours, impl, TS.Runner(ours, ours.trainable_parameters(), ours.known_classes, batch, dev, amp))
        loop, loop_params = TS.build_loop(ours)
        runners[("loop", t)] = TS.Runner(loop, loop_params, ours.known_classes, batch, dev, amp)
    torch.manual_seed(0)
    frozen = Frozen().to(dev)
    runners[("frozen", 0)] = TS.Runner(frozen, [*frozen.qv_bias, *frozen.head.parameters()], 0, batch, dev, amp)

    times = {k: [] for k in runners}
    failed = {}
    for r in range(s["rounds"] + 1):  # round 0 warms up (Triton compile, cuBLAS heuristics): dropped
        for key, runner in runners.items():
            if key in failed:
                continue
            try:
                dt = TS.timed(runner.step, dev)
            except Exception as exc:  # noqa: BLE001 - e.g. the loop out of memory at T = 50
                failed[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                if cuda:
                    torch.cuda.empty_cache()
                continue
            if r:
                times[key].append(dt)
    ms = {f"{v}_t{t}" if v != "frozen" else "frozen": round(min(x) * 1e3, 2) for (v, t), x in times.items() if x}
    peak = {}
    if cuda:
        for (v, t), runner in runners.items():
            if (v, t) in failed:
                continue
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            runner.step()
            torch.cuda.synchronize()
            used = torch.cuda.max_memory_allocated() - base
            peak[f"{v}_t{t}" if v != "frozen" else "frozen"] = round(used / 2**20, 1)
    ours = "ours_triton" if cuda else "ours_reference"  # what adapter.impl='auto' runs on this device
    per_t = {}
    for t in s["tasks"]:
        o, lp, ref = ms.get(f"{ours}_t{t}"), ms.get(f"loop_t{t}"), ms.get(f"ours_reference_t{t}")
        row = {"ours_ms": o, "loop_ms": lp, "ours_reference_ms": ref, "frozen_ms": ms.get("frozen")}
        if o:
            row["ours_over_frozen"] = round(o / ms["frozen"], 3) if ms.get("frozen") else None
            row["loop_over_ours"] = round(lp / o, 3) if lp else None
            row["triton_over_reference"] = round(o / ref, 3) if cuda and ref else None
            row["ours_img_s"] = round(s["batch"] / (o / 1e3), 1)
            row["ours_over_ours_t1"] = round(o / ms[f"{ours}_t{s['tasks'][0]}"], 3) \
                if ms.get(f"{ours}_t{s['tasks'][0]}") else None
        if ref and cuda:  # the PyTorch path's own ratios (what adapter.impl='reference' would give)
            row["reference_over_frozen"] = round(ref / ms["frozen"], 3) if ms.get("frozen") else None
            row["loop_over_reference"] = round(lp / ref, 3) if lp else None
        row["peak_mib_ours"], row["peak_mib_loop"] = peak.get(f"{ours}_t{t}"), peak.get(f"loop_t{t}")
        row["peak_mib_reference"] = peak.get(f"ours_reference_t{t}") if cuda else None
        per_t[t] = row
    return {"ours": ours, "batch": s["batch"], "d": s["d"], "layers": s["layers"], "image": s["image"],
            "amp": "bfloat16" if cuda else "no", "rounds": s["rounds"], "stat": "min over interleaved rounds",
            "ms": ms, "peak_step_mib": peak, "per_t": per_t, "variant_failures": failed,
            "skipped_variants": skipped, "peak_method": "torch.cuda max_memory_allocated during one step minus "
                                                        "memory_allocated before it"}
