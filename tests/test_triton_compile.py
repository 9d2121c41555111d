"""The Triton kernels compiled for NVIDIA GPUs (sm_90, sm_80) on this CPU-only machine.

The interpreter (every other kernel test) accepts block shapes, register use and shared memory that
a GPU refuses. Here Triton's bundled ptxas compiles every kernel at the launchers' block sizes, with
the specialisation of a real launch, for ViT-B/16, ViT-L/16 and ViT-g/14 widths, T = 1 and 50, fp32 /
bf16 / fp16 (sdlora_ds/kernels/compile_check.py); a compile error, any spill, or shared memory above
the per-block opt-in limit fails. The compiling runs in a child process: conftest.py sets
TRITON_INTERPRET=1 for this session, and the interpreter compiles nothing."""
import json
import os
import subprocess
import sys
import textwrap

import torch

from sdlora_ds.kernels import compile_check as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compiled_env(tmp_path) -> dict:
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton_cache"), PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    return env


def test_every_kernel_compiles_for_sm90_and_sm80(tmp_path):
    out = tmp_path / "compile.json"
    proc = subprocess.run([sys.executable, "-m", "sdlora_ds.kernels.compile_check", "--json", str(out)], cwd=ROOT,
                          env=compiled_env(tmp_path), capture_output=True, text=True, timeout=600)
    print(proc.stdout)  # the table (pytest -s, or shown on failure)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = json.loads(out.read_text())
    for r in records:
        assert r["problems"] == [], r
        assert r["registers"] and r["spill_stores"] == 0 and r["spill_loads"] == 0
        assert 0 < r["shared"] <= C.SHARED_LIMIT[r["target"]]
    covered = {(r["target"], c["kernel"], c["compute"], c["weights"], f"{c['model']} T{c['tasks']}")
               for r in records for c in r["cases"]}
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    for target in (90, 80):
        for model in ("ViT-B/16", "ViT-L/16", "ViT-g/14"):
            for t in (1, 50):
                for compute, weights in C.DTYPES:
                    key = (target, "merge", names[compute], names[weights], f"{model} T{t}")
                    assert key in covered, key
                    if t > 1:  # colsum works on frozen columns only: none at T = 1
                        assert (target, "colsum", names[compute], names[weights], f"{model} T{t}") in covered
    # the launchers' block sizes are what was compiled
    from sdlora_ds.kernels import triton_stacked as ts
    merge_blocks = {tuple(r["meta"].values()) for r in records if r["kernel"] == "merge"}
    assert merge_blocks == {(ts.MERGE_BLOCK_O, ts.MERGE_BLOCK_I, ts.MERGE_BLOCK_R)}
    assert {tuple(r["meta"][k] for k in ("BLOCK_N", "BLOCK_R", "BLOCK_K")) for r in records if r["kernel"] == "colsum"} \
        == {(ts.COLSUM_BLOCK_N, ts.COLSUM_BLOCK_R, ts.COLSUM_BLOCK_K)}


PROBE = textwrap.dedent("""
    import json, sys, torch
    from sdlora_ds.kernels import compile_check as C
    case = [c for c in C.vit_cases(models={"ViT-B/16": (768, 197)}, tasks=(50,),
                                   dtypes=((torch.float32, torch.float32),)) if c.kernel == "merge"][0]
    out = {}
    for name, meta in [("k8", dict(BLOCK_O=32, BLOCK_I=32, BLOCK_R=8)), ("k4", dict(BLOCK_O=32, BLOCK_I=32, BLOCK_R=4)),
                       ("big", dict(BLOCK_O=128, BLOCK_I=128, BLOCK_R=64))]:
        r = C.compile_one(case.launch._replace(meta=meta), 90, "merge")
        out[name] = dict(error=r.error, registers=r.registers, spill_stores=r.spill_stores, shared=r.shared,
                         problems=r.problems())
    print(json.dumps(out))
""")


def test_dot_rule_and_spills_are_caught(tmp_path):
    """The rule triton_stacked.py states: a tl.dot on fp32 operands needs K >= 8 (merge's K is
    BLOCK_R), so 8 compiles and 4 is refused; and a tile too big for the registers is caught by its
    spills, which triton.compile itself does not report."""
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=compiled_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["k8"]["error"] is None and got["k8"]["problems"] == []
    assert "K >= 8" in got["k4"]["error"] and got["k4"]["problems"][0].startswith("compile error")
    assert got["big"]["error"] is None and got["big"]["spill_stores"] > 0  # 128 x 128 fp32 accumulator
    assert any("spills" in p for p in got["big"]["problems"])


def record(**kw) -> "C.Compiled":
    base = dict(kernel="merge", target=80, compute="float32", weights="float32", signature="", meta={},
                registers=64, spill_stores=0, spill_loads=0, stack_frame=0, shared=1024)
    return C.Compiled(**{**base, **kw})


def test_shared_memory_is_judged_against_the_opt_in_limit():
    assert record(target=80, shared=166_912).problems() == []
    assert "166912 B" in record(target=80, shared=166_913).problems()[0]
    assert record(target=90, shared=232_448).problems() == []  # the H100 limit is higher than A100's
    assert "sm_90" in record(target=90, shared=232_449).problems()[0]
    assert record(registers=None).problems()  # a log that was not captured is a failure, not a pass
    line = C.failures([record(spill_stores=8, spill_loads=8, meta={"BLOCK_O": 128})])[0]
    assert "spills" in line and "BLOCK_O" in line and "MERGE_BLOCK_" in line


def test_ptxas_log_parsing():
    log = ("ptxas info    : Compiling entry function '_colsum_kernel' for 'sm_90a'\n"
           "ptxas info    : Function properties for _colsum_kernel\n"
           "    152 bytes stack frame, 96 bytes spill stores, 112 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n")
    assert C.parse_ptxas_log(log) == {"registers": 255, "stack_frame": 152, "spill_stores": 96, "spill_loads": 112}
    assert C.parse_ptxas_log("") == {}
