"""The stacked low-rank op alone: ours vs the eager per-task loop vs a plain F.linear, one run.

One adapted projection of width d with T tasks (T - 1 frozen directions + the current one, rank r
each), forward + backward with every trainable gradient (x, magnitudes, A_t, B_t, m_t). Timings are
the minimum (or --stat median) over interleaved rounds (the three variants alternate, so machine
drift hits them alike; contention on a shared machine only ever adds time).
Prints a table, the ratios, and ends with ONE JSON line. No assertions.

    python bench/stacked_lowrank.py                 # CPU defaults: 8 x 197 tokens, d = 384
    python bench/stacked_lowrank.py --tokens 25216 --d 768 --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from timing import STATS, add_timing_args, device_name, setup_timing
from sdlora_ds.kernels import stacked_lowrank_linear


def make_case(t_count, d, rank, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(d, d, generator=g) / math.sqrt(d)).to(device, dtype)
    bias = torch.zeros(d).to(device, dtype)
    tasks = [(torch.randn(rank, d, generator=g) / math.sqrt(d), torch.randn(d, rank, generator=g) * 0.01)
             for _ in range(t_count)]
    tasks = [(a.to(device, dtype), b.to(device, dtype)) for a, b in tasks]
    inv_norms = torch.stack([1.0 / (a.float().norm() * b.float().norm()) for a, b in tasks[:-1]] or
                            [torch.zeros(())]).to(device)
    mags = torch.ones(t_count, device=device, requires_grad=True)  # m_0..m_t, shared, trainable
    a_t, b_t = (t.clone().requires_grad_(True) for t in tasks[-1])
    return w, bias, tasks, inv_norms, mags, a_t, b_t


IMPL = "auto"  # --impl


def ours(x, w, bias, tasks, inv_norms, mags, a_t, b_t, a_f, b_f, col_task):
    s_f = (mags[:-1] * inv_norms[: len(tasks) - 1])[col_task]  # (R_f,) per-column scale
    return stacked_lowrank_linear(x, w, bias, a_f, b_f, s_f, a_t, b_t, mags[-1], impl=IMPL)


def per_task_loop(x, w, bias, tasks, inv_norms, mags, a_t, b_t, *_):
    """What the reference code does: every earlier direction applied to the activations."""
    y = F.linear(x, w, bias)
    for i, (a, b) in enumerate(tasks[:-1]):
        y = y + (mags[i] * inv_norms[i]) * F.linear(F.linear(x, a), b)
    return y + mags[-1] * F.linear(F.linear(x, a_t), b_t)


def plain(x, w, bias, *_):
    return F.linear(x, w, bias)


def step(fn, x, dy, args, params):
    for p in params:
        p.grad = None
    x.grad = None
    fn(x, *args).backward(dy)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8 * 197, help="batch x sequence rows (default 8 x 197)")
    ap.add_argument("--d", type=int, default=384, help="projection width (ViT-S 384, ViT-B 768)")
    ap.add_argument("--rank", type=int, default=10)
    ap.add_argument("--tasks", type=int, nargs="+", default=[1, 5, 10, 20])
    ap.add_argument("--rounds", type=int, default=15)
    add_timing_args(ap)
    ap.add_argument("--impl", default="auto", choices=["auto", "reference", "triton"],
                    help="implementation of 'ours' (auto: Triton on CUDA, reference on CPU)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    global IMPL
    IMPL = args.impl
    clock = setup_timing(args)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    variants = {"ours": ours, "loop": per_task_loop, "plain": plain}
    cases = {}
    for t in args.tasks:
        w, bias, tasks, inv_norms, mags, a_t, b_t = make_case(t, args.d, args.rank, args.device, dtype)
        a_f = torch.cat([a for a, _ in tasks[:-1]] or [w.new_zeros(0, args.d)])      # (R_f, d)
        b_f = torch.cat([b for _, b in tasks[:-1]] or [w.new_zeros(args.d, 0)], 1)   # (d, R_f)
        col_task = torch.arange(t - 1, device=args.device).repeat_interleave(args.rank)
        x = torch.randn(args.tokens, args.d, device=args.device, dtype=dtype, requires_grad=True)
        dy = torch.randn(args.tokens, args.d, device=args.device, dtype=dtype)
        cases[t] = (x, dy, (w, bias, tasks, inv_norms, mags, a_t, b_t, a_f, b_f, col_task), [mags, a_t, b_t])
    times = {(v, t): [] for v in variants for t in args.tasks}
    for r in range(args.rounds + 1):  # round 0 warms up (allocator, kernels) and is dropped
        for t in args.tasks:
            for name, fn in variants.items():
                x, dy, fn_args, params = cases[t]
                sync(args.device)
                t0 = clock()
                step(fn, x, dy, fn_args, params)
                sync(args.device)
                if r:
                    times[(name, t)].append(clock() - t0)
    med = {k: STATS[args.stat](v) * 1e3 for k, v in times.items()}
    device = device_name(args.device)
    print(f"stacked low-rank op, forward+backward, {args.tokens} x {args.d}, rank {args.rank}, "
          f"{args.dtype}, {device}, {args.stat} of {args.rounds} rounds, {args.clock} clock (ms)")
    print(f"{'T':>4} {'plain':>9} {'ours':>9} {'loop':>9} {'ours/plain':>11} {'loop/ours':>10}")
    for t in args.tasks:
        p, o, lp = med[("plain", t)], med[("ours", t)], med[("loop", t)]
        print(f"{t:>4} {p:9.2f} {o:9.2f} {lp:9.2f} {o / p:11.3f} {lp / o:10.3f}")
    t_lo, t_hi = min(args.tasks), max(args.tasks)
    result = {"bench": "stacked_lowrank", "device": device, "tokens": args.tokens, "d": args.d,
              "rank": args.rank, "impl": args.impl, "dtype": args.dtype, "rounds": args.rounds, "stat": args.stat,
              "clock": args.clock,
              "ms": {f"{v}_t{t}": round(med[(v, t)], 3) for v in variants for t in args.tasks},
              f"ours_t{t_hi}_over_t{t_lo}": round(med[("ours", t_hi)] / med[("ours", t_lo)], 3),
              f"loop_over_ours_t{t_hi}": round(med[("loop", t_hi)] / med[("ours", t_hi)], 3),
              f"ours_over_plain_t{t_hi}": round(med[("ours", t_hi)] / med[("plain", t_hi)], 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
