"""A full SD-LoRA training step on a ViT-S/16-sized backbone at T = 1, 5, 10, 20 tasks, one process.

(a) ours: the project's SDLoRAModel (sdlora_ds.model), q/v projections through the stacked
    low-rank Function (merge into the weight, custom backward).
(b) loop: the same weights with the q/v projections replaced by a per-task loop written plainly
    below, the way both reference code bases do it (every earlier direction applied to the
    activations in every forward, norms recomputed per forward, a zero direction skipped).
A step = forward, cross-entropy on the current task's logits, backward, SGD(momentum 0.9) step.
Timings: the minimum (or --stat median) over interleaved rounds (all variants alternate, so
machine drift hits them alike; contention on a shared machine only ever adds time). Peak memory: the highest "Total Allocated" the PyTorch profiler reports during one step
(profile_memory=True; it counts tensor bytes allocated by PyTorch's allocator from the start of the
profiled step: activations saved for backward, gradients, temporaries. It does not see the weights
allocated before the step, Python objects, or allocator caching/fragmentation, so it is a measure of
what a step adds, not of the process RSS). Eval: forward of a merged model (`merged_eval`) vs a
plain backbone without adapters. Prints ratios and ends with ONE JSON line; no assertions.

    python bench/train_step.py                     # CPU: batch 8
    python bench/train_step.py --batch 128 --device cuda
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from timing import STATS, add_timing_args, device_name, setup_timing
from sdlora_ds.config import config_from_dict
from sdlora_ds.model import SDLoRAModel, build_backbone
from sdlora_ds.model.backbone import cls_features


class LoopLoRALinear(nn.Module):
    """Baseline: y = W x + b + sum_{i<t} (m_i + k_i) B_i A_i x / (||B_i|| ||A_i||) + m_t B_t A_t x,
    one pair of skinny matmuls per task on the activations (the reference implementations)."""

    def __init__(self, layer, mags):
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        ranks = layer.frozen_ranks.tolist()
        self.a_list = list(layer.a_frozen.split(ranks, 0))   # T-1 x (r_i, d_in), frozen
        self.b_list = list(layer.b_frozen.split(ranks, 1))   # T-1 x (d_out, r_i), frozen
        self.a_cur = nn.Parameter(layer.a_cur.detach().clone())
        self.b_cur = nn.Parameter(layer.b_cur.detach().clone())
        object.__setattr__(self, "mags", mags)

    def forward(self, x):  # (B, N, d_in)
        y = F.linear(x, self.weight, self.bias)
        mk = self.mags()  # (T,) m + k
        for i, (a, b) in enumerate(zip(self.a_list, self.b_list)):
            norm = torch.linalg.norm(b) * torch.linalg.norm(a)
            if norm != 0:  # on a GPU a host sync per task and layer, as in LibContinual
                y = y + (mk[i] / norm) * F.linear(F.linear(x, a), b)
        return y + mk[len(self.a_list)] * F.linear(F.linear(x, self.a_cur), self.b_cur)


def make_cfg(args):
    return config_from_dict({
        "name": "bench",
        "backbone": {"source": "config", "hidden_size": args.d, "num_layers": args.layers,
                     "num_heads": args.heads, "mlp_size": 4 * args.d, "patch_size": 16,
                     "image_size": args.image_size},
        "adapter": {"rank": args.rank, "impl": args.impl},
        "cil": {"num_classes": args.classes_per_task * max(args.tasks), "init_classes": args.classes_per_task,
                "increment": args.classes_per_task, "num_tasks": max(args.tasks)},
        "data": {"index": "unused/index.json", "image_size": args.image_size},
    })


def build_ours(cfg, t_count, cpt, device):
    torch.manual_seed(0)
    model = SDLoRAModel(cfg)
    for t in range(t_count):
        if t:  # a trained earlier task: non-zero B, so its frozen direction has a real norm
            for layer in model.layers:
                layer.b_cur.data.normal_(0, 0.01)
        model.start_task(t, cpt)
    model.set_trainable()
    return model.to(device)


def build_loop(ours):
    model = copy.deepcopy(ours)
    for layer in model.layers:
        parent = next(m for m in model.backbone.modules() if layer in list(m.children()))
        attr = next(n for n, c in parent.named_children() if c is layer)
        setattr(parent, attr, LoopLoRALinear(layer, model.magnitudes))
    model.layers = [m for m in model.backbone.modules() if isinstance(m, LoopLoRALinear)]
    params = [p for m in model.layers for p in (m.a_cur, m.b_cur)]
    return model, params + [model.magnitudes.m, model.head.weight, model.head.bias]


class Runner:
    """One model + its optimizer + a fixed batch; `step()` is the timed unit."""

    def __init__(self, model, params, known, batch, device, amp=None):
        self.model, self.known, self.amp = model, known, amp
        self.device_type = torch.device(device).type
        self.opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        self.x = batch[0].to(device)
        self.y = batch[1].to(device)

    def step(self):
        # amp: mixed precision as accelerate's bf16/fp16 gives it (autocast over the forward)
        with torch.autocast(self.device_type, dtype=self.amp, enabled=self.amp is not None):
            logits = self.model(self.x)                                    # (B, C_seen)
            loss = F.cross_entropy(logits[:, self.known:].float(), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def peak_step_bytes(runner) -> int:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    return max((e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"), default=0)


def timed(fn, device, clock=time.perf_counter):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = clock()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return clock() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="images per step (CPU default 8; 128 on a GPU)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--rank", type=int, default=10)
    ap.add_argument("--tasks", type=int, nargs="+", default=[1, 5, 10, 20])
    ap.add_argument("--classes-per-task", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--impl", default="auto", choices=["auto", "reference", "triton"])
    add_timing_args(ap)
    ap.add_argument("--amp", default="no", choices=["no", "bfloat16", "float16"],
                    help="autocast dtype for the training steps (fp32 weights, as under accelerate)")
    args = ap.parse_args()
    clock = setup_timing(args)
    cfg = make_cfg(args)
    g = torch.Generator().manual_seed(0)
    batch = (torch.rand(args.batch, 3, args.image_size, args.image_size, generator=g),
             torch.randint(0, args.classes_per_task, (args.batch,), generator=g))
    runners, max_diff = {}, 0.0
    for t in args.tasks:
        ours = build_ours(cfg, t, args.classes_per_task, args.device)
        loop, loop_params = build_loop(ours)
        with torch.no_grad():  # same function, two implementations: a sanity figure, not a test
            max_diff = max(max_diff, (ours(batch[0][:2].to(args.device)) -
                                      loop(batch[0][:2].to(args.device))).abs().max().item())
        known = ours.known_classes
        amp = None if args.amp == "no" else getattr(torch, args.amp)
        runners[("ours", t)] = Runner(ours, ours.trainable_parameters(), known, batch, args.device, amp)
        runners[("loop", t)] = Runner(loop, loop_params, known, batch, args.device, amp)
    times = {k: [] for k in runners}
    for r in range(args.rounds + 1):  # round 0 warms up and is dropped
        for key, runner in runners.items():
            dt = timed(runner.step, args.device, clock)
            if r:
                times[key].append(dt)
    ms = {k: STATS[args.stat](v) * 1e3 for k, v in times.items()}
    t_lo, t_hi = min(args.tasks), max(args.tasks)
    peak = {k: peak_step_bytes(runners[k]) for k in [("ours", t_lo), ("ours", t_hi), ("loop", t_lo), ("loop", t_hi)]}

    # evaluation: merged SD-LoRA model vs the plain backbone (no adapters), same head
    ours_hi = runners[("ours", t_hi)].model.eval()
    plain = build_backbone(cfg.backbone).to(args.device).eval()
    head = ours_hi.head
    x_eval = batch[0].to(args.device)
    eval_fns = {"merged": lambda: ours_hi(x_eval), "plain": lambda: head(cls_features(plain, x_eval))}
    eval_ms = {"merged": [], "plain": []}
    with torch.no_grad(), ours_hi.merged_eval():
        for r in range(2 * args.rounds + 1):  # forwards are cheap: twice the rounds, order flipped
            for name in (("merged", "plain") if r % 2 else ("plain", "merged")):  # each round
                dt = timed(eval_fns[name], args.device, clock)
                if r:
                    eval_ms[name].append(dt)
    eval_med = {k: STATS[args.stat](v) * 1e3 for k, v in eval_ms.items()}

    device = device_name(args.device)
    print(f"SD-LoRA train step, ViT d={args.d} x {args.layers} layers, {args.image_size}px, batch {args.batch}, "
          f"rank {args.rank}, {device}, {args.stat} of {args.rounds} rounds, {args.clock} clock; "
          f"ours vs loop logits max diff {max_diff:.2e}")
    print(f"{'T':>4} {'ours ms':>9} {'loop ms':>9} {'loop/ours':>10} {'ours/ours_T1':>13}")
    for t in args.tasks:
        print(f"{t:>4} {ms[('ours', t)]:9.1f} {ms[('loop', t)]:9.1f} {ms[('loop', t)] / ms[('ours', t)]:10.3f} "
              f"{ms[('ours', t)] / ms[('ours', t_lo)]:13.3f}")
    print("peak step memory (MiB): " + ", ".join(f"{v}@T{t}={b / 2**20:.1f}" for (v, t), b in peak.items()))
    print(f"eval forward: merged {eval_med['merged']:.1f} ms, plain backbone {eval_med['plain']:.1f} ms")
    result = {
        "bench": "train_step", "device": device, "batch": args.batch, "d": args.d, "layers": args.layers,
        "image_size": args.image_size, "rank": args.rank, "rounds": args.rounds, "stat": args.stat,
        "clock": args.clock, "impl": args.impl, "amp": args.amp,
        "ms": {f"{v}_t{t}": round(x, 1) for (v, t), x in ms.items()},
        "peak_step_mib": {f"{v}_t{t}": round(b / 2**20, 1) for (v, t), b in peak.items()},
        f"ours_t{t_hi}_over_t{t_lo}": round(ms[("ours", t_hi)] / ms[("ours", t_lo)], 3),
        f"baseline_over_ours_t{t_hi}": round(ms[("loop", t_hi)] / ms[("ours", t_hi)], 3),
        f"peak_mem_t{t_hi}_over_t{t_lo}": round(peak[("ours", t_hi)] / peak[("ours", t_lo)], 3),
        f"baseline_peak_mem_t{t_hi}_over_t{t_lo}": round(peak[("loop", t_hi)] / peak[("loop", t_lo)], 3),
        "eval_merged_over_plain": round(eval_med["merged"] / eval_med["plain"], 3),
        "logits_max_diff_ours_vs_loop": max_diff,
        "peak_mem_method": "torch.profiler profile_memory: max 'Total Allocated' during one step",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
