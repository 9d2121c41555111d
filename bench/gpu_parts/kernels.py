"""kernel_compile (ptxas figures for sm_90/sm_80, no device needed) and kernel_correctness (the Triton
Function and kernels against the reference, on the device) parts."""
from __future__ import annotations

import os


def part_kernel_compile(ctx) -> dict:
    import torch
    from sdlora_ds.kernels import compile_check as CC
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 in the part's environment: the interpreter compiles nothing")
    kw = dict(models={"ViT-B/16": CC.MODELS["ViT-B/16"]}, tasks=(1, 20), dtypes=((torch.bfloat16, torch.float32),)) \
        if ctx["smoke"] else {}
    targets = (90,) if ctx["smoke"] else (90, 80)
    records, table, bad = CC.run(targets=targets, **kw)
    res = {"targets": list(targets), "table": table, "records": [CC.record_json(r) for r in records]}
    if bad:
        res["_failed"] = " || ".join(bad)
    return res


def part_kernel_correctness(ctx) -> dict:
    import torch
    from sdlora_ds.kernels import selfcheck as SC
    cases = SC.GUARD_CASES
    combos = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]
    if not ctx["smoke"]:
        cases = cases + (SC.Case("vitb_t20", 3 * 197, 768, 768, 190, 10),     # ViT-B q/v at 20 tasks
                         SC.Case("ragged_t50", 1111, 777, 769, 490, 10))      # 50 tasks, no width a block multiple
        combos.append((torch.float16, torch.float16))
    out, bad = {}, []
    for x_dt, w_dt in combos:
        rec = SC.check(x_dt, ctx["device"], w_dt, cases=cases, record=False, announce=False)
        key = f"{SC._name(x_dt)}/w_{SC._name(w_dt)}"
        out[key] = rec
        if not rec["passed"]:
            bad.append(f"{key}: {rec['error']}")
    res = {"cases": [c.__dict__ for c in cases], "checks": out}
    if bad:
        res["_failed"] = " || ".join(bad)
    return res
