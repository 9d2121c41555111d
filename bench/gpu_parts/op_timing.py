"""op_timing part: the stacked low-rank op alone (bench/stacked_lowrank.py), ours vs the loop vs F.linear."""
from __future__ import annotations

import time

from .common import on_cuda


def part_op_timing(ctx) -> dict:
    import torch
    import stacked_lowrank as SB  # bench/stacked_lowrank.py
    s, dev, cuda = ctx["sizes"], ctx["device"], on_cuda(ctx)
    dtype = torch.bfloat16 if cuda else torch.float32
    impls = ["triton", "reference"] if cuda else ["reference"]

    def ours_with(impl):
        def fn(*a):
            SB.IMPL = impl
            return SB.ours(*a)
        return fn

    variants = {**{f"ours_{i}": ours_with(i) for i in impls}, "loop": SB.per_task_loop, "plain": SB.plain}
    cases = {}
    for t in s["tasks"]:
        torch.manual_seed(0)
        w, bias, tasks, inv_norms, mags, a_t, b_t = SB.make_case(t, s["d"], s["rank"], dev, dtype)
        a_f = torch.cat([a for a, _ in tasks[:-1]] or [w.new_zeros(0, s["d"])])       # (R_f, d)
        b_f = torch.cat([b for _, b in tasks[:-1]] or [w.new_zeros(s["d"], 0)], 1)    # (d, R_f)
        col_task = torch.arange(t - 1, device=dev).repeat_interleave(s["rank"])
        x = torch.randn(s["tokens"], s["d"], device=dev, dtype=dtype, requires_grad=True)
        dy = torch.randn(s["tokens"], s["d"], device=dev, dtype=dtype)
        cases[t] = (x, dy, (w, bias, tasks, inv_norms, mags, a_t, b_t, a_f, b_f, col_task), [mags, a_t, b_t])
    times = {(v, t): [] for v in variants for t in s["tasks"]}
    for r in range(s["op_rounds"] + 1):
        for t in s["tasks"]:
            for name, fn in variants.items():
                x, dy, fn_args, params = cases[t]
                SB.sync(dev)
                t0 = time.perf_counter()
                SB.step(fn, x, dy, fn_args, params)
                SB.sync(dev)
                if r:
                    times[(name, t)].append(time.perf_counter() - t0)
    ms = {f"{v}_t{t}": round(min(x) * 1e3, 3) for (v, t), x in times.items()}
    ours = "ours_triton" if cuda else "ours_reference"
    per_t = {t: {"ours_ms": ms[f"{ours}_t{t}"], "loop_ms": ms[f"loop_t{t}"], "plain_ms": ms[f"plain_t{t}"],
                 "ours_reference_ms": ms[f"ours_reference_t{t}"],
                 "ours_over_plain": round(ms[f"{ours}_t{t}"] / ms[f"plain_t{t}"], 3),
                 "loop_over_ours": round(ms[f"loop_t{t}"] / ms[f"{ours}_t{t}"], 3),
                 "triton_over_reference": round(ms[f"ours_triton_t{t}"] / ms[f"ours_reference_t{t}"], 3)
                 if cuda else None} for t in s["tasks"]}
    return {"ours": ours, "tokens": s["tokens"], "d": s["d"], "rank": s["rank"], "dtype": str(dtype).split(".")[1],
            "rounds": s["op_rounds"], "ms": ms, "per_t": per_t,
            "skipped_variants": {} if cuda else {"ours_triton": "the Triton path needs CUDA"}}
