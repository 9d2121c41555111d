"""A guard for the Triton path: before the first CUDA use in a process (per compute dtype and
weight dtype), run the Triton Function and the reference Function on one small problem and
compare the forward and every gradient. A disagreement, or a kernel that fails to compile or run,
stops the run with one error line naming `adapter.impl`, the measured difference and the fix.
There is no silent fallback: the user switches to the PyTorch path explicitly.

Why: the kernels were written and tested under TRITON_INTERPRET=1, which is more lenient than the
compiler (it runs each program in numpy), and `adapter.impl='auto'` sends every CUDA user through
them. A new GPU, Triton or driver can miscompile them; this costs well under a second per dtype.

The problem is small and awkward on purpose: no width is a multiple of a block size, the frozen
stack (R_f = 70) spans several BLOCK_R chunks of the merge and two column blocks of the colsum
kernel with a ragged tail, and the first case is task 0 (no frozen column at all). Both ways of
adding the current task (merged into the weight, or unmerged: safe_bf16) are compared, and the two
kernels are also compared directly (the Function's backward may take the dense-gradient path,
which does not call the colsum kernel).

Tolerances (max |triton - reference| / max |reference|, per compared tensor):
- float32: 1e-4 (the kernels accumulate in fp32 with exact products; only the summation order
  differs, ~1e-6). 5e-3 when TF32 matmuls are enabled (torch.backends.cuda.matmul.allow_tf32 or a
  float32 matmul precision other than 'highest'): the reference GEMMs are then TF32 (10-bit
  mantissa) while the kernels stay exact.
- float16: 1e-2; bfloat16: 4e-2. The merged weight is rounded once to 16 bits in both; the
  reference rounds the skinny projections to 16 bits where the colsum kernel keeps them in fp32
  (measured differences ~1e-3 / ~1e-2). A real kernel bug (a missed block, a wrong stride) gives
  errors of order 1 in at least one tensor.

The outcome is recorded (`results()`: one dict per checked dtype pair) for the trainer's logs,
and rank 0 prints one line.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from . import reference as ref

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
TF32_TOLERANCE = 5e-3  # float32 when the reference's GEMMs run in TF32
FIX = 'set adapter.impl to "reference" (--set adapter.impl=reference) to train with the PyTorch path'


class KernelSelfCheckError(RuntimeError):
    """The Triton path disagreed with the reference, or failed to compile/run. One line."""


@dataclass(frozen=True)
class Case:
    """One comparison problem: x (bn, d_in), frozen stack of r_f columns, current task of rank r_c."""
    name: str
    bn: int
    d_in: int
    d_out: int
    r_f: int
    r_c: int


# The guard's problem (see the module docstring); gpu_check.py adds ViT-B-sized cases.
GUARD_CASES = (Case("task0", 45, 100, 90, 0, 10), Case("task7", 45, 100, 90, 70, 6))

_RESULTS: dict = {}  # (compute dtype, weight dtype) -> record


def results() -> list:
    """Every check run in this process so far (copies), for the trainer's logs / results.json."""
    return [dict(r) for r in _RESULTS.values()]


def reset() -> None:
    """Forget earlier checks (tests)."""
    _RESULTS.clear()


def _on_device(x: torch.Tensor) -> bool:
    """The guard covers compiled kernels, i.e. CUDA tensors (tests monkeypatch this to run it
    under the interpreter on CPU)."""
    return x.is_cuda


def guard(x: torch.Tensor, weight: torch.Tensor) -> Optional[dict]:
    """Called where the Triton path is chosen, with the Function's (BN, d_in) input in the compute
    dtype. First call per (x.dtype, weight.dtype) in this process: run the check (raises
    KernelSelfCheckError on a mismatch); later calls: return the record, or raise the same error
    again if that check failed. CPU tensors (the interpreter) are not checked: returns None."""
    if not _on_device(x):
        return None
    key = (x.dtype, weight.dtype)
    rec = _RESULTS.get(key)
    if rec is None:
        rec = check(x.dtype, x.device, weight.dtype)
    if not rec["passed"]:
        raise KernelSelfCheckError(rec["error"])
    return rec


def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    if dtype == torch.float32 and torch.device(device).type == "cuda":
        if torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest":
            return TF32_TOLERANCE
    return TOLERANCE[dtype]


def check(dtype: torch.dtype, device, weight_dtype: Optional[torch.dtype] = None, cases=GUARD_CASES,
          record: bool = True, announce: bool = True) -> dict:
    """Compare the Triton path with the reference on `cases`; returns the record (and, with
    record=True, stores it for results()/guard). Never raises for a mismatch or a kernel failure:
    the record says passed=False and carries the one-line error; guard() raises it."""
    weight_dtype = weight_dtype or dtype
    device = torch.device(device)
    tol = tolerance(dtype, device)
    rec = {"check": "triton_vs_reference", "dtype": _name(dtype), "weight_dtype": _name(weight_dtype),
           "device": _device_name(device), "triton": _triton_version(), "tolerance": tol,
           "cases": [c.name for c in cases], "passed": False, "max_rel_diff": None, "worst": None,
           "diffs": {}, "seconds": None, "error": None}
    t0 = time.perf_counter()
    try:
        diffs = {}
        # the guard may be reached inside autocast, no_grad or inference mode (evaluation): the
        # check builds its own leaves and needs autograd, in the dtypes given
        with torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(device.type, enabled=False):
            for case in cases:
                diffs.update(compare_case(case, dtype, weight_dtype, device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - a compile/launch failure of any kind stops the run
        what = f"{type(exc).__name__}: {_first_line(exc)}"
        rec["error"] = (f"kernel self-check failed: adapter.impl='triton' (the Triton path, also chosen by "
                        f"'auto' on CUDA) could not compile or run its kernels on {rec['device']} in "
                        f"{rec['dtype']} ({what}); no difference measured; {FIX}")
    else:
        worst = max(diffs, key=diffs.get)
        rec.update(diffs={k: float(f"{v:.3e}") for k, v in diffs.items()}, worst=worst,
                   max_rel_diff=float(f"{diffs[worst]:.3e}"), passed=diffs[worst] <= tol)
        if not rec["passed"]:
            rec["error"] = (f"kernel self-check failed: adapter.impl='triton' (the Triton path, also chosen by "
                            f"'auto' on CUDA) disagrees with the reference on {rec['device']} in {rec['dtype']}: "
                            f"max relative difference {diffs[worst]:.3e} in {worst} (tolerance {tol:.0e}); {FIX}")
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    if record:
        _RESULTS[(dtype, weight_dtype)] = rec
    if announce:
        _announce(rec)
    return rec


def compare_case(case: Case, dtype, weight_dtype, device) -> dict:
    """{'<case>/<tensor>': max relative difference} for the forward and every gradient of the
    Function (both current-task modes), and for the two kernels alone."""
    from . import triton_stacked as ts  # lazy, as the op's dispatch: triton is imported on first use
    triton_fn = ts.function()
    w, bias, a_f, b_f, s_f, cur, x0, dy = _problem(case, dtype, weight_dtype, device)
    out = {}
    for unmerged in (False, True):
        if unmerged and cur[0] is None:
            continue
        got = _run(triton_fn, x0, dy, w, bias, a_f, b_f, s_f, cur, unmerged)
        want = _run(ref.StackedLowRankFunction, x0, dy, w, bias, a_f, b_f, s_f, cur, unmerged)
        mode = "unmerged" if unmerged else "merged"
        for name in want:
            out[f"{case.name}/{mode}/{name}"] = _rel(got[name], want[name])
    # the kernels directly, whatever path the backward's cost model picks at this size
    out[f"{case.name}/merge_kernel"] = _rel(ts.merge(w, a_f, b_f, s_f, *cur, True, dtype),
                                            ref._merge_torch(w, a_f, b_f, s_f, *cur, True, dtype))
    if case.r_f:
        xd, dyd = x0.to(dtype), dy.to(dtype)
        a, b = a_f.to(dtype).float(), b_f.to(dtype).float()
        want = ((xd.float() @ a.t()) * (dyd.float() @ b)).sum(0)  # fp32 projections, as the kernel
        out[f"{case.name}/colsum_kernel"] = _rel(ts.colsum(xd, dyd, a_f, b_f), want)
    return out


def _problem(case: Case, dtype, weight_dtype, device):
    """Random factors with an update of the same order as W (so a merge error shows in y) and a
    trained current task (B_cur != 0). Drawn from a private generator: the run's RNG is untouched."""
    g = torch.Generator().manual_seed(1234 + case.r_f)
    d_in, d_out = case.d_in, case.d_out

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, weight_dtype)

    w = rnd(d_out, d_in, scale=d_in ** -0.5)
    bias = rnd(d_out, scale=0.1)
    a_f, b_f = rnd(case.r_f, d_in, scale=d_in ** -0.5), rnd(d_out, case.r_f, scale=case.r_f ** -0.5 if case.r_f else 1)
    s_f = (torch.rand(case.r_f, generator=g) + 0.5)
    if case.r_f > 12:
        s_f[5:12] = 0.0  # a zero (e.g. KD-folded) direction inside the stack
    s_f = s_f.to(device, weight_dtype)
    cur = (rnd(case.r_c, d_in, scale=d_in ** -0.5), rnd(d_out, case.r_c, scale=0.3),
           torch.tensor(0.8).to(device, weight_dtype)) if case.r_c else (None, None, None)
    x0 = torch.randn(case.bn, d_in, generator=g).to(device, dtype)
    dy = torch.randn(case.bn, d_out, generator=g).to(device, dtype)
    return w, bias, a_f, b_f, s_f, cur, x0, dy


def _run(fn, x0, dy, w, bias, a_f, b_f, s_f, cur, unmerged) -> dict:
    """Forward + backward of one Function; every output the trainer uses."""
    x = x0.clone().requires_grad_(True)
    s = s_f.clone().requires_grad_(True)
    c = [t.clone().requires_grad_(True) if t is not None else None for t in cur]
    y = fn.apply(x, w, bias, a_f, b_f, s, *c, unmerged)
    y.backward(dy)
    out = {"y": y, "grad_x": x.grad}
    if s.numel():
        out["grad_s_frozen"] = s.grad
    if c[0] is not None:
        out.update(grad_a_cur=c[0].grad, grad_b_cur=c[1].grad, grad_m_cur=c[2].grad)
    return out


def _rel(got: Optional[torch.Tensor], want: Optional[torch.Tensor]) -> float:
    """max |got - want| / max |want|; inf when one side is missing, has another shape or is not finite."""
    if got is None or want is None or got.shape != want.shape:
        return float("inf")
    diff = (got.float() - want.float()).abs().max().item()
    if diff != diff:  # NaN
        return float("inf")
    return diff / max(want.float().abs().max().item(), 1e-12)


def _announce(rec: dict) -> None:
    if _rank() != 0:
        return
    if rec["passed"]:
        print(f"kernel self-check: adapter.impl='triton' matches the reference on {rec['device']} in {rec['dtype']} "
              f"(weights {rec['weight_dtype']}, triton {rec['triton']}): max relative difference "
              f"{rec['max_rel_diff']:.1e} (tolerance {rec['tolerance']:.0e}), {rec['seconds']:.2f} s", flush=True)
    else:
        print(f"error: {rec['error']}", file=sys.stderr, flush=True)


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else "CPU"


def _triton_version() -> Optional[str]:
    try:
        import triton
        return triton.__version__
    except Exception:  # noqa: BLE001 - reported as missing; the check itself then fails to run
        return None


def _first_line(exc: BaseException) -> str:
    """The exception on one line: its first three non-empty lines joined (a Triton compile error
    starts with a position line), at most 300 characters."""
    line = " | ".join([t.strip() for t in str(exc).splitlines() if t.strip()][:3])
    return line if len(line) <= 300 else line[:297] + "..."
