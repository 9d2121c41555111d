"""Compile the Triton kernels for NVIDIA targets without a GPU, and judge the result.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` runs Triton's bundled ptxas on a
CPU-only machine. It raises on a compile error or an illegal block shape, but NOT on register spills
or on shared memory over the device's limit (a device checks those only when it loads the kernel),
and `CompiledKernel.n_regs` / `n_spills` are filled only on a device. So this module:

- builds each launch exactly as the launchers do (`triton_stacked.merge_launch` / `colsum_launch`,
  on meta tensors: no memory, no device) and binds it with Triton's own launch binder, so the
  specialisation is the one a real launch gets: unit strides become constexpr 1, pointers and ints
  divisible by 16 carry `tt.divisibility` 16 (a plain all-i32 signature gives other register counts);
  meta tensors report data_ptr() 0, i.e. 16-byte aligned, as PyTorch's CUDA allocations are;
- compiles it for each target with Triton's cache bypassed (ptxas really runs) and reads registers
  and spill bytes from ptxas's verbose log, shared memory from `metadata.shared`;
- judges it: a compile error, any spill, or shared memory above the per-block opt-in limit fails.

The shapes mirror what the forward/backward send to the kernels (reference.shared_forward/shared_backward):
compute dtype fp32 merges the current task's r columns into the stack, bf16/fp16 keep it out
(safe_bf16) so task 0 launches the merge with R = 0; colsum runs only for frozen columns (T > 1) and
only when the projections are cheaper than the dense gradient (`launched` says so; compiled anyway).

Used by tests/test_triton_compile.py (CI, no GPU), `python -m sdlora_ds.kernels.compile_check`
(prints the table) and bench/gpu_check.py's kernel_compile part.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import time
from typing import Iterable, Optional

import torch

# Maximum shared memory per block with the opt-in attribute (CUDA programming guide, compute
# capabilities table): 227 KiB on sm_90 (H100/H200), 163 KiB on sm_80 (A100).
SHARED_LIMIT = {90: 232_448, 80: 166_912}
TARGET_NAMES = {90: "sm_90 (H100/H200)", 80: "sm_80 (A100)"}

# name -> (hidden width d, tokens per image at 224 px incl. CLS); ViT-g/14 is DINOv2's (d 1536),
# "ViT-g/14 EVA" the EVA/OpenCLIP one (d 1408)
MODELS = {
    "ViT-B/16": (768, 197),
    "ViT-L/16": (1024, 197),
    "ViT-g/14": (1536, 257),
    "ViT-g/14 EVA": (1408, 257),
}
TASKS = (1, 50)
RANK = 10
MICRO_BATCH = 128  # the seed configs' global batch on one GPU; 8 GPUs give 16: also a multiple of 16
# (compute dtype, weight dtype): fp32; bf16/fp16 autocast over fp32 weights (accelerate without
# DeepSpeed); bf16/fp16 weights (DeepSpeed casts the model)
DTYPES = ((torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
          (torch.float16, torch.float32), (torch.float16, torch.float16))


class CompileCheckError(RuntimeError):
    """A kernel does not compile, spills, or needs more shared memory than the target allows."""


@dataclasses.dataclass
class Case:
    """One kernel launch of one layer shape: which model, T, dtypes it stands for."""
    kernel: str
    model: str
    tasks: int
    compute: str
    weights: str
    launched: bool
    note: str
    launch: object = dataclasses.field(repr=False, default=None)


@dataclasses.dataclass
class Compiled:
    """What one compilation gave (one row of the table)."""
    kernel: str
    target: int
    compute: str
    weights: str
    signature: str
    meta: dict
    div16: str = ""
    num_warps: int = 0
    num_stages: int = 0
    registers: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    stack_frame: Optional[int] = None
    shared: Optional[int] = None
    seconds: float = 0.0
    error: Optional[str] = None
    cases: list = dataclasses.field(default_factory=list)

    def problems(self) -> list:
        """Why this compilation fails the check ([] if it passes)."""
        if self.error:
            return [f"compile error: {self.error}"]
        out = []
        if self.registers is None:
            out.append("no ptxas register line in the log (was the log captured?)")
        if (self.spill_stores or 0) or (self.spill_loads or 0):
            out.append(f"register spills: {self.spill_stores} bytes stored, {self.spill_loads} bytes loaded")
        limit = SHARED_LIMIT[self.target]
        if self.shared is None or self.shared > limit:
            out.append(f"shared memory {self.shared} B > {limit} B, the per-block opt-in limit of "
                       f"{TARGET_NAMES[self.target]}")
        return out


def _dt(name: torch.dtype) -> str:
    return str(name).split(".")[-1]


def vit_cases(models: Optional[dict] = None, tasks: Iterable[int] = TASKS, dtypes=DTYPES,
              rank: int = RANK, micro_batch: int = MICRO_BATCH) -> list:
    """Every kernel launch of one adapted q/v projection (d x d) for each model, T and dtype pair,
    built by the launchers themselves on meta tensors."""
    from . import triton_stacked as ts
    from .reference import _LOW_PRECISION, _dense_is_cheaper
    meta = dict(device="meta")
    cases = []
    for model, (d, tokens) in (models or MODELS).items():
        bn = micro_batch * tokens
        for t in tasks:
            r_f = (t - 1) * rank
            for compute, wdt in dtypes:
                w = torch.empty(d, d, dtype=wdt, **meta)
                a_f, b_f = torch.empty(r_f, d, dtype=wdt, **meta), torch.empty(d, r_f, dtype=wdt, **meta)
                s_f = torch.empty(r_f, dtype=wdt, **meta)
                a_c, b_c = torch.empty(rank, d, dtype=wdt, **meta), torch.empty(d, rank, dtype=wdt, **meta)
                m_c = torch.empty((), dtype=wdt, **meta)
                include_cur = compute not in _LOW_PRECISION  # safe_bf16 default: 16-bit keeps it unmerged
                k = ts.merge_launch(w, a_f, b_f, s_f, a_c, b_c, m_c, include_cur, compute)
                r_merge = r_f + (rank if include_cur else 0)
                cases.append(Case("merge", model, t, _dt(compute), _dt(wdt), True,
                                  f"R={r_merge}" + ("" if include_cur else " (current task unmerged)"), k))
                x = torch.empty(bn, d, dtype=compute, **meta)
                dy = torch.empty(bn, d, dtype=compute, **meta)
                if r_f == 0:  # task 0: no frozen column, colsum is never launched
                    continue
                dense = _dense_is_cheaper(bn, d, d, r_f, rank)
                k = ts.colsum_launch(x, dy, a_f, b_f)
                cases.append(Case("colsum", model, t, _dt(compute), _dt(wdt), not dense,
                                  f"BN={bn} R_f={r_f}" + (" (not launched: dense gradient cheaper)" if dense else ""),
                                  k))
    return cases


def _key(case: Case, target: int) -> tuple:
    """Cases that bind to the same specialisation share one compilation."""
    sig, constexprs, attrs, _ = _bind(case.launch, target)
    return (case.kernel, target, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())),
            tuple(sorted((k, str(v)) for k, v in attrs.items())))


_BINDERS: dict = {}


def _bind(launch, target: int):
    """(signature, constexprs, attrs, options) of the launch, as JITFunction.run computes them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = launch.kernel
    key = (id(fn), target)
    if key not in _BINDERS:
        backend = make_backend(GPUTarget("cuda", target, 32))
        _BINDERS[key] = (backend, create_function_from_signature(fn.signature, fn.params, backend))
    backend, binder = _BINDERS[key]
    bound, spec, options = binder(*launch.args, **launch.meta)
    options, sig, constexprs, attrs = fn._pack_args(backend, dict(launch.meta), bound, spec, options)
    return sig, constexprs, attrs, options


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"),
}


def parse_ptxas_log(log: str) -> dict:
    """registers, stack frame and spill bytes from ptxas -v output ({} where a line is missing)."""
    out = {}
    m = _PTXAS["registers"].search(log)
    if m:
        out["registers"] = int(m.group(1))
    m = _PTXAS["stack"].search(log)
    if m:
        out["stack_frame"], out["spill_stores"], out["spill_loads"] = map(int, m.groups())
    return out


def _divisible_ints(names: list, sig: dict, attrs: dict) -> str:
    """The integer arguments the launch marks `tt.divisibility` 16 (comma-separated)."""
    marked = {names[path[0]] for path, a in attrs.items() if a}
    return ",".join(n for n in names if n in marked and not sig[n].startswith("*"))


def compile_one(launch, target: int, kernel: str = "") -> Compiled:
    """Compile one launch for sm_<target> (cache bypassed, so ptxas runs) and read its figures."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig, constexprs, attrs, options = _bind(launch, target)
    rec = Compiled(kernel=kernel or launch.kernel.__name__, target=target, compute="", weights="",
                   signature=", ".join(f"{k}:{v}" for k, v in sig.items() if v != "constexpr"),
                   meta={k: v for k, v in launch.meta.items()},
                   div16=_divisible_ints(launch.kernel.arg_names, sig, attrs))
    knobs = triton.knobs
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    buf = io.StringIO()
    t0 = time.perf_counter()
    try:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
        with contextlib.redirect_stdout(buf):  # ptxas's log is print()ed by Triton's nvidia backend
            k = triton.compile(ASTSource(launch.kernel, sig, constexprs, attrs),
                               target=GPUTarget("cuda", target, 32), options=options.__dict__)
        rec.shared = int(k.metadata.shared)
        rec.num_warps, rec.num_stages = k.metadata.num_warps, k.metadata.num_stages
        for name, value in parse_ptxas_log(buf.getvalue()).items():
            setattr(rec, name, value)
    except Exception as exc:  # noqa: BLE001 - recorded; problems() turns it into a failure
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        # a CompilationError reads "at L:C:", the source, then the reason: keep the first and last line
        text = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
        rec.error = f"{type(exc).__name__}: {text}"[:500]
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
        rec.seconds = round(time.perf_counter() - t0, 2)
    return rec


def compile_all(cases: list, targets: Iterable[int] = (90, 80)) -> list:
    """One compilation per distinct (kernel, target, specialisation); each lists the cases it covers."""
    done: dict = {}
    for target in targets:
        for case in cases:
            key = _key(case, target)
            if key not in done:
                done[key] = compile_one(case.launch, target, case.kernel)
            done[key].cases.append(case)
    for rec in done.values():  # colsum casts the factors to the compute dtype: weight dtypes share one
        rec.compute = ",".join(dict.fromkeys(c.compute for c in rec.cases))
        rec.weights = ",".join(dict.fromkeys(c.weights for c in rec.cases))
    return list(done.values())


def _cases_text(cases: list) -> str:
    by_model: dict = {}
    for c in cases:
        tag = f"T{c.tasks}" + ("" if c.launched else "*")
        by_model.setdefault(c.model, set()).add(tag)
    return "; ".join(f"{m} {','.join(sorted(v, key=lambda s: int(s[1:].rstrip('*'))))}" for m, v in by_model.items())


def format_table(records: list) -> str:
    """Markdown table, one row per compilation (`*`: compiled, not launched at that shape; unit
    strides are constexpr 1 and not listed)."""
    head = ("| target | kernel | compute / weights | blocks | ints divisible by 16 | warps/stages | registers "
            "| spill B (st/ld) | shared B (limit) | s | status | cases |")
    lines = [head, "|" + "---|" * 12]
    for r in sorted(records, key=lambda r: (-r.target, r.kernel, r.compute, r.weights, r.signature)):
        blocks = "x".join(str(v) for k, v in r.meta.items() if k.startswith("BLOCK"))
        probs = r.problems()
        status = "ok" if not probs else "FAIL: " + "; ".join(probs)
        lines.append(f"| sm_{r.target} | {r.kernel} | {r.compute} / {r.weights} | {blocks} | {r.div16} "
                     f"| {r.num_warps}/{r.num_stages} "
                     f"| {r.registers} | {r.spill_stores}/{r.spill_loads} | {r.shared} ({SHARED_LIMIT[r.target]}) "
                     f"| {r.seconds} | {status} | {_cases_text(r.cases)} |")
    return "\n".join(lines)


def failures(records: list) -> list:
    """One line per failing compilation: kernel, target, dtypes, blocks, what is wrong, the fix."""
    out = []
    for r in records:
        for p in r.problems():
            out.append(f"{r.kernel} for sm_{r.target} ({r.compute} compute, {r.weights} weights, blocks {r.meta}): "
                       f"{p}; change the block sizes in sdlora_ds/kernels/triton_stacked.py "
                       f"(MERGE_BLOCK_* / COLSUM_BLOCK_*)")
    return out


def record_json(r: Compiled) -> dict:
    """A JSON-able record: the figures, the problems, and the cases it covers."""
    out = {f.name: getattr(r, f.name) for f in dataclasses.fields(r) if f.name != "cases"}
    out["cases"] = [{k: getattr(c, k) for k in ("kernel", "model", "tasks", "compute", "weights", "launched", "note")}
                    for c in r.cases]
    out["problems"] = r.problems()
    return out


def run(targets: Iterable[int] = (90, 80), **kw) -> tuple:
    """(records, table, failure lines) for the launchers' kernels at every model/T/dtype of vit_cases."""
    records = compile_all(vit_cases(**kw), targets)
    return records, format_table(records), failures(records)


def main(argv=None) -> int:
    import argparse
    import json
    import os
    ap = argparse.ArgumentParser(description="Compile the Triton kernels for sm_90/sm_80 and check registers, "
                                             "spills and shared memory (no GPU needed)")
    ap.add_argument("--targets", default="90,80", help="compute capabilities, e.g. 90,80")
    ap.add_argument("--json", default=None, help="also write the records here")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: TRITON_INTERPRET=1 is set: the interpreter compiles nothing; unset it to run this check")
        return 2
    t0 = time.perf_counter()
    records, table, bad = run(targets=[int(t) for t in a.targets.split(",")])
    print(table)
    print(f"{len(records)} compilations in {time.perf_counter() - t0:.1f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([record_json(r) for r in records], f, indent=1, default=str)
    for line in bad:
        print(f"error: {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
