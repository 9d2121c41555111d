"""Every GPU measurement of the project in one call, under 8 minutes on one H100/H200 (bash bench/gpu_check.sh).

Parts, in order of importance (each runs in its own process with its own timeout, and records
pass/fail/skipped, its time and the error text, so one failing part does not lose the others):

  env                 versions, device, the packages the parts import
  kernel_compile      every Triton kernel compiled by Triton's ptxas for sm_90 and sm_80 at the launchers'
                      block sizes (sdlora_ds/kernels/compile_check.py): registers, spills, shared memory
                      vs the per-block limit; no device needed (--cpu-smoke: ViT-B/16 bf16 on sm_90 only)
  kernel_correctness  Triton Function + kernels vs the reference Function, forward and every gradient
                      (sdlora_ds/kernels/selfcheck.py), fp32 / bf16 (fp32 and bf16 weights) / fp16,
                      on the guard's awkward shapes plus ViT-B-sized ragged ones (R_f = 190 and 490)
  step_timing         a full training step (bench/train_step.py's models and Runner) at ViT-B/16 (d 768,
                      12 layers, random weights), batch 128, bf16 autocast, T = 1, 5, 20, 50: ours
                      (Triton and reference impl, same model), the per-task loop, and the frozen
                      backbone without adapters; ratios from one interleaved run; peak memory per T
                      (CUDA allocator: max allocated during one step minus what was held before it)
  op_timing           the stacked low-rank op alone (bench/stacked_lowrank.py's functions), 128 x 197
                      tokens, d 768, bf16: ours (Triton / reference) vs the loop vs plain F.linear
  shards              synthetic 224-px JPEGs (bench/data_throughput.make_jpegs) -> shards.imagefolder
  e2e_train           a 2-task run `accelerate launch --config_file launch/accelerate_1gpu.yaml
                      launch/train.py` on those shards (ViT-B/16 from config), img/s from the
                      TensorBoard step wall times (steady state: each task's first step left out)
  data_shards         img/s of the training loader (sdlora_ds.data.build_loader) on that shard folder
  data_bench_cuda     bench/data_throughput.py --device cuda --out-json (GPU decode path)
  data_bench_cpu      bench/data_throughput.py --device cpu --out-json

Outputs under --out (default $OUT): gpu_check.json (everything, rewritten after each part) and
gpu_check.md (tables). --cpu-smoke (or SDLORA_GPU_CHECK_CPU=1): the same parts with tiny shapes on
the CPU, device-only variants skipped with the reason (the CPU test, tests/test_gpu_check.py).
The orchestrating process imports only the standard library, so a missing package is reported
(missing_packages) instead of crashing the script. The report is never lost: a part that fails (an error,
a crash, a timeout, an unreadable result) is recorded with its error and the remaining parts run
where they can (device parts are skipped when env finds no GPU); gpu_check.json and gpu_check.md are
rewritten after every part, and the last line printed names every failed part (exit 1).
SDLORA_GPU_CHECK_FAIL=part,... makes those parts fail on purpose (tests/test_gpu_check.py).

Layout: this file orchestrates (and is the CLI); bench/gpu_parts/ holds the parts (one module per kind
of measurement, `part_<name>(ctx) -> dict`), bench/gpu_check_report.py the JSON, markdown and targets.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import traceback

from gpu_check_report import markdown, result_of, save_report, summary_line, targets  # noqa: F401
from gpu_parts.common import BENCH, ROOT, Skip, run_cmd, sizes  # noqa: F401

TOTAL_BUDGET_S = 450  # 7.5 min: the device call's 8-minute target with margin for start-up and copying
REQUIRED = ["torch", "torchvision", "transformers", "accelerate", "webdataset", "safetensors", "numpy", "PIL",
            "tqdm", "tensorboard"]

# (budget s, estimate s on one H100/H200; estimates from the step counts below, not yet measured)
PARTS = {
    "env": (30, 5),
    "kernel_compile": (90, 25),
    "kernel_correctness": (90, 25),
    "step_timing": (180, 75),
    "op_timing": (60, 20),
    "shards": (45, 15),
    "e2e_train": (150, 70),
    "data_shards": (30, 10),
    "data_bench_cuda": (75, 40),
    "data_bench_cpu": (75, 40),
}
# part -> the bench/gpu_parts module holding part_<name>
MODULES = {"env": "env", "kernel_compile": "kernels", "kernel_correctness": "kernels", "step_timing": "step_timing",
           "op_timing": "op_timing", "shards": "e2e", "e2e_train": "e2e", "data_shards": "data",
           "data_bench_cuda": "data", "data_bench_cpu": "data"}
SMOKE_BUDGET_FACTOR = 3
DEVICE_PARTS = {"kernel_correctness", "step_timing", "op_timing", "e2e_train", "data_bench_cuda"}
NEEDS_SHARDS = {"e2e_train", "data_shards"}


def child_main(a) -> int:
    """Run one part; write {'status', 'result'|'error', 'traceback'} to a.result."""
    ctx = {"smoke": a.cpu_smoke, "device": "cpu" if a.cpu_smoke else "cuda", "work": a.work,
           "sizes": sizes(a.cpu_smoke), "timeout": a.timeout}
    rec = {}
    try:
        inject = [p for p in os.environ.get("SDLORA_GPU_CHECK_FAIL", "").split(",") if p]
        if a.run_part in inject:
            raise RuntimeError(f"failure injected by SDLORA_GPU_CHECK_FAIL={','.join(inject)}")
        module = importlib.import_module(f"gpu_parts.{MODULES[a.run_part]}")
        result = getattr(module, f"part_{a.run_part}")(ctx)
        failed = result.pop("_failed", None) if isinstance(result, dict) else None
        rec = {"status": "fail" if failed else "pass", "result": result, "error": failed}
    except Skip as exc:
        rec = {"status": "skipped", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - the part failed; the others go on
        rec = {"status": "fail", "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:600],
               "traceback": traceback.format_exc()[-3000:], "result": ctx.get("partial")}
    with open(a.result, "w") as f:
        json.dump(rec, f, indent=1, default=str)
    return 0


# ============================================================================ orchestration (stdlib only)
def missing_packages(smoke: bool) -> list:
    missing = [m for m in REQUIRED + ([] if smoke else ["triton"]) if importlib.util.find_spec(m) is None]
    if missing:
        print(f"gpu_check: missing python packages: {', '.join(missing)} "
              f"(install them: pip install -r requirements.txt; triton comes with CUDA builds of torch)", flush=True)
    return missing


def orchestrate(a) -> int:
    smoke = a.cpu_smoke
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    work = a.work or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if smoke:
        env["TRITON_INTERPRET"] = "1"  # kernel_correctness runs the kernels under the interpreter
    else:
        env.pop("TRITON_INTERPRET", None)  # compiled kernels: that is what this script checks
    budget = a.budget_s
    start = time.perf_counter()
    report = {"bench": "gpu_check", "mode": "cpu-smoke" if smoke else "gpu", "started_utc":
              time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "total_budget_s": budget,
              "sizes": sizes(smoke), "missing_packages": missing_packages(smoke), "parts": {}}
    est = sum(e for _, e in PARTS.values())
    print(f"gpu_check ({report['mode']}): {len(PARTS)} parts, estimated {est} s on one H100/H200, "
          f"total budget {budget} s; work folder {work}", flush=True)
    names = [p for p in PARTS if not a.only or p in a.only.split(",")]
    for name in names:
        part_budget, estimate = PARTS[name]
        rec = {"budget_s": part_budget, "estimate_s": estimate}
        try:
            rec.update(run_part(name, report, names, a, work, env, start))
        except Exception as exc:  # noqa: BLE001 - a bug here must not lose the other parts or the report
            rec.update(status="fail", error=f"gpu_check could not run the part: {type(exc).__name__}: {exc}"[:600],
                       traceback=traceback.format_exc()[-3000:])
        report["parts"][name] = rec
        msg = rec.get("error") or rec.get("reason") or ""
        print(f"[{time.perf_counter() - start:6.1f} s] {name}: {rec['status'].upper()}"
              f"{' in %.1f s' % rec['seconds'] if 'seconds' in rec else ''}{' - ' + msg if msg else ''}", flush=True)
        report["total_s"] = round(time.perf_counter() - start, 1)
        save_report(report, out)
    if not a.keep_work and not a.work:
        shutil.rmtree(work, ignore_errors=True)
    print(summary_line(report, out), flush=True)
    return 0 if all(p["status"] != "fail" for p in report["parts"].values()) else 1


def run_part(name: str, report: dict, names: list, a, work: str, env: dict, start: float) -> dict:
    """Run one part in its own process (or skip it); its record: status, seconds, result or error."""
    smoke, budget = a.cpu_smoke, a.budget_s
    part_budget, estimate = PARTS[name]
    left = budget - (time.perf_counter() - start)
    env_rec = report["parts"].get("env") or {}
    shards_rec = report["parts"].get("shards") or {}
    if not smoke and name in DEVICE_PARTS and env_rec.get("status") == "fail":
        return dict(status="skipped", reason=f"device part; env found no usable GPU ({env_rec.get('error')})")
    if name in NEEDS_SHARDS and "shards" in names and shards_rec.get("status") != "pass":
        return dict(status="skipped", reason="needs the shard folder; the 'shards' part did not pass")
    if left < 10:
        return dict(status="skipped", reason=f"the {budget} s total budget was used up")
    # the budgets are sized for a GPU machine; a shared CPU may take many seconds to import torch
    scale = a.budget_scale if a.budget_scale is not None else (SMOKE_BUDGET_FACTOR if smoke else 1)
    timeout = min(part_budget * scale, left)
    print(f"[{time.perf_counter() - start:6.1f} s] {name}: estimate ~{estimate} s, timeout {timeout:.0f} s", flush=True)
    result_path = os.path.join(work, f"part_{name}.json")
    if os.path.exists(result_path):
        os.remove(result_path)
    cmd = [sys.executable, os.path.abspath(__file__), "--run-part", name, "--work", work, "--result",
           result_path, "--timeout", str(int(timeout))] + (["--cpu-smoke"] if smoke else [])
    t0 = time.perf_counter()
    rc, text = run_cmd(cmd, timeout, env=child_env(name, env))
    rec = {"seconds": round(time.perf_counter() - t0, 1)}
    loaded = None
    if os.path.isfile(result_path):
        try:
            with open(result_path) as f:
                loaded = json.load(f)
        except (OSError, ValueError) as exc:  # e.g. the part was killed while writing it
            loaded = {"status": "fail", "error": f"unreadable part result {result_path}: {exc}"}
    if isinstance(loaded, dict) and loaded.get("status") in ("pass", "fail", "skipped"):
        rec.update(loaded)
    elif rc == 124:
        rec.update(status="fail", error=f"timed out after {timeout:.0f} s (part budget {part_budget} s)")
    else:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        rec.update(status="fail", error=f"part process exited {rc}: {(lines or [''])[-1][:400]}")
    rec["output_tail"] = text[-2000:]
    return rec


def child_env(name: str, env: dict) -> dict:
    """The child's environment: kernel_compile compiles for NVIDIA targets, never interprets."""
    if name == "kernel_compile":
        env = dict(env)
        env.pop("TRITON_INTERPRET", None)
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "runs", "gpu_check"),
                    help="output folder (default $OUT, else runs/gpu_check)")
    ap.add_argument("--cpu-smoke", action="store_true", default=os.environ.get("SDLORA_GPU_CHECK_CPU") == "1",
                    help="tiny shapes on the CPU, device-only variants skipped (also SDLORA_GPU_CHECK_CPU=1)")
    ap.add_argument("--only", default=None, help="comma-separated parts to run (e.g. to rerun what failed)")
    ap.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S, help="total time budget in seconds")
    ap.add_argument("--budget-scale", type=float, default=None,
                    help=f"multiply every part's budget (default 1; {SMOKE_BUDGET_FACTOR} with --cpu-smoke)")
    ap.add_argument("--work", default=None, help="work folder for shards and runs (default: a temporary one, removed)")
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary work folder")
    ap.add_argument("--run-part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=60, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.only and set(a.only.split(",")) - set(PARTS):
        ap.error(f"--only: unknown part(s) {sorted(set(a.only.split(',')) - set(PARTS))}; parts: {list(PARTS)}")
    return child_main(a) if a.run_part else orchestrate(a)


if __name__ == "__main__":
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
