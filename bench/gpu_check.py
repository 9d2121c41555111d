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

"frozen" = the plain ViT (no adapter) with every weight frozen; only the biases of the adapted
q/v projections take a gradient (a sum over tokens each), so its backward walks the same graph as
SD-LoRA's (down to block 0's q/v outputs) without any low-rank work: the floor of any q/v adapter.

Outputs under --out (default $OUT): gpu_check.json (everything, rewritten after each part) and
gpu_check.md (tables). --cpu-smoke (or SDLORA_GPU_CHECK_CPU=1): the same parts with tiny shapes on
the CPU, device-only variants skipped with the reason (the CPU test, tests/test_gpu_check.py).
The orchestrating process imports only the standard library, so a missing package is reported
(preflight) instead of crashing the script. The report is never lost: a part that fails (an error,
a crash, a timeout, an unreadable result) is recorded with its error and the remaining parts run
where they can (device parts are skipped when env finds no GPU); gpu_check.json and gpu_check.md are
rewritten after every part, and the last line printed names every failed part (exit 1).
SDLORA_GPU_CHECK_FAIL=part,... makes those parts fail on purpose (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
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
DEVICE_PARTS = {"kernel_correctness", "step_timing", "op_timing", "e2e_train", "data_bench_cuda"}
NEEDS_SHARDS = {"e2e_train", "data_shards"}


def sizes(smoke: bool) -> dict:
    """The measured shapes (GPU) or tiny ones that exercise the same code (CPU smoke)."""
    if smoke:
        return dict(d=32, layers=2, heads=4, image=32, batch=2, tasks=[1, 20], rounds=1, rank=4, cpt=2,
                    tokens=64, op_rounds=1, classes=4, per_class=12, jpeg=64, e2e_epochs=1, e2e_batch=8,
                    workers=0, bench_images=24)
    return dict(d=768, layers=12, heads=12, image=224, batch=128, tasks=[1, 5, 20, 50], rounds=10, rank=10,
                cpt=10, tokens=128 * 197, op_rounds=20, classes=4, per_class=768, jpeg=224, e2e_epochs=2,
                e2e_batch=128, workers=max(1, min(8, (os.cpu_count() or 2) - 2)), bench_images=400)


# ============================================================================ parts (child process)
class Skip(Exception):
    """The whole part does not apply here (reason in the message)."""


def part_env(ctx) -> dict:
    import torch
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
            "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
            "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
    for mod in ("triton", "transformers", "accelerate", "torchvision", "deepspeed", "webdataset"):
        try:
            info[mod] = importlib.import_module(mod).__version__
        except Exception as exc:  # noqa: BLE001 - recorded, the parts that need it fail on their own
            info[mod] = f"unavailable ({type(exc).__name__}: {exc})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                    device_count=torch.cuda.device_count())
    else:
        info["device"] = "CPU"
        if not ctx["smoke"]:
            raise RuntimeError("no CUDA device: torch.cuda.is_available() is False (torch "
                               f"{torch.__version__}, built for CUDA {torch.version.cuda}); "
                               "use --cpu-smoke for the CPU plumbing check")
    return info


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


def _cuda(ctx) -> bool:
    return ctx["device"].startswith("cuda")


def part_step_timing(ctx) -> dict:
    import torch
    from torch import nn
    import train_step as TS
    from sdlora_ds.model import build_backbone
    from sdlora_ds.model.backbone import cls_features, find_targets

    s, dev, cuda = ctx["sizes"], ctx["device"], _cuda(ctx)
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


def part_op_timing(ctx) -> dict:
    import torch
    import stacked_lowrank as SB  # bench/stacked_lowrank.py
    s, dev, cuda = ctx["sizes"], ctx["device"], _cuda(ctx)
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


def part_shards(ctx) -> dict:
    from data_throughput import make_jpegs  # bench/data_throughput.py
    from shards.imagefolder import convert_folder
    s = ctx["sizes"]
    src, out = os.path.join(ctx["work"], "jpegs"), os.path.join(ctx["work"], "shards")
    for d in (src, out):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    # longer side s["jpeg"] px (the 4th argument is the (shortest, longest) range of the longer side)
    make_jpegs(src, s["classes"] * s["per_class"], s["classes"], (s["jpeg"], s["jpeg"]))
    gen_s = time.perf_counter() - t0
    index = convert_folder(src, out, workers=max(1, s["workers"]), progress=False)
    return {"index": index, "train_images": s["classes"] * s["per_class"], "classes": s["classes"],
            "jpeg_px": s["jpeg"], "generate_s": round(gen_s, 2), "convert_s": round(time.perf_counter() - t0 - gen_s, 2)}


def _index(ctx) -> str:
    path = os.path.join(ctx["work"], "shards", "index.json")
    if not os.path.isfile(path):
        raise RuntimeError(f"no shard index at {path}: the 'shards' part did not produce it")
    return path


def e2e_overrides(ctx, index: str) -> list:
    """The --set overrides of the 2-task run (the base config is written by part_e2e_train)."""
    s = ctx["sizes"]
    return [f"backbone.hidden_size={s['d']}", f"backbone.num_layers={s['layers']}",
            f"backbone.num_heads={s['heads']}", f"backbone.mlp_size={4 * s['d']}", f"backbone.image_size={s['image']}",
            f"data.image_size={s['image']}", f"data.test_resize={s['image']}", f"data.index={index}",
            f"data.num_workers={s['workers']}", f"optim.global_batch={s['e2e_batch']}",
            f"optim.epochs={s['e2e_epochs']}", f"adapter.rank={s['rank']}",
            f"output_dir={os.path.join(ctx['work'], 'runs')}"]


def part_e2e_train(ctx) -> dict:
    s = ctx["sizes"]
    index = _index(ctx)
    base = {"name": "gpu_check_e2e",
            "backbone": {"source": "config", "patch_size": 16},
            "cil": {"num_classes": s["classes"], "init_classes": s["classes"] // 2,
                    "increment": s["classes"] // 2, "num_tasks": 2},
            "data": {"index": index}, "optim": {"lr": 0.01},
            "train": {"log_every": 5, "keep_checkpoints": 1}}
    cfg_path = os.path.join(ctx["work"], "e2e_config.json")
    with open(cfg_path, "w") as f:
        json.dump(base, f, indent=1)
    shutil.rmtree(os.path.join(ctx["work"], "runs"), ignore_errors=True)
    accel = ["--config_file", os.path.join("launch", "accelerate_1gpu.yaml")] if _cuda(ctx) else \
        ["--config_file", os.path.join("launch", "accelerate_cpu.yaml"), "--num_processes", "1",
         "--main_process_port", "0"]  # 0: a free port (a shared CPU machine may hold 29500)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *accel, os.path.join("launch", "train.py"),
           "--config", cfg_path]
    for o in e2e_overrides(ctx, index):
        cmd += ["--set", o]
    t0 = time.perf_counter()
    rc, text = run_cmd(cmd, ctx["timeout"] - 5, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    wall = time.perf_counter() - t0
    with open(os.path.join(ctx["work"], "e2e_train.log"), "w") as f:
        f.write(text)
    check_lines = [ln for ln in text.splitlines() if "kernel self-check" in ln]
    res = ctx["partial"] = {"command": " ".join(cmd), "returncode": rc, "wall_s": round(wall, 1),
                            "selfcheck_lines": check_lines, "log_tail": text[-3000:]}
    if rc != 0:
        err = [ln for ln in text.splitlines() if ln.startswith("error:") or "Error" in ln]
        raise RuntimeError(f"accelerate launch exited {rc}: {(err or text.splitlines() or [''])[-1][:400]}")
    run_dir = os.path.join(ctx["work"], "runs", "gpu_check_e2e")
    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    train_imgs = (s["classes"] // 2) * s["per_class"] * s["e2e_epochs"]  # per task
    res.update(task_seconds=results["task_seconds"], mixed_precision=results.get("mixed_precision"),
               img_s_task_wall=round(2 * train_imgs / sum(results["task_seconds"]), 1),
               img_s_task_wall_note="train images / task seconds (includes engine set-up, evaluation, checkpoint)")
    res.update(steady_rate(os.path.join(run_dir, "tensorboard"), s["e2e_batch"]))
    return res


def steady_rate(tb_dir: str, batch: int) -> dict:
    """img/s between each task's second and last optimizer step, from the wall times TensorBoard
    stores with every train/loss point (the trainer logs after the step's loss reached the host)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    loss = {e.step: e.wall_time for e in acc.Scalars("train/loss")}
    task = {e.step: int(e.value) for e in acc.Scalars("train/task")}
    per_task = {}
    for t in sorted(set(task.values())):
        steps = sorted(st for st, tt in task.items() if tt == t)
        if len(steps) >= 3:
            a, b = steps[1], steps[-1]
            per_task[t] = {"steps": b - a, "img_s": round((b - a) * batch / (loss[b] - loss[a]), 1)}
    n = sum(v["steps"] for v in per_task.values())
    overall = round(sum(v["img_s"] * v["steps"] for v in per_task.values()) / n, 1) if n else None
    return {"img_s_steady": overall, "img_s_steady_per_task": per_task,
            "img_s_steady_note": "each task's first step (compile, worker start) left out; data loading included"}


def _epoch(loader) -> tuple:
    """(seconds, images) of one pass over a loader, wall clock."""
    t0, n = time.perf_counter(), 0
    for x, _ in loader:
        n += x.shape[0]
    return time.perf_counter() - t0, n


def part_data_shards(ctx) -> dict:
    from sdlora_ds.config import DataConfig
    from sdlora_ds.data import ShardIndex, build_loader
    s = ctx["sizes"]
    path = _index(ctx)
    index = ShardIndex.load(path, verify_checksums=True)
    cfg = DataConfig(index=path, image_size=s["image"], test_resize=s["image"], num_workers=s["workers"])
    kw = dict(split="train", class_ids=list(range(index.num_classes)), train=True, batch_size=s["e2e_batch"],
              rank=0, world_size=1, seed=0)
    epochs = [_epoch(build_loader(index, cfg, epoch=e, **kw)) for e in range(2)]  # epoch 0 warms up
    secs, n = epochs[1]
    return {"workers": s["workers"], "images": n, "seconds": round(secs, 3), "img_s": round(n / secs, 1),
            "img_s_per_worker": round(n / secs / max(1, s["workers"]), 1), "warmup_epoch_s": round(epochs[0][0], 3)}


def _data_bench(ctx, device: str) -> dict:
    s = ctx["sizes"]
    path = os.path.join(ctx["work"], f"data_bench_{device}.json")
    if os.path.exists(path):
        os.remove(path)
    cmd = [sys.executable, os.path.join("bench", "data_throughput.py"), "--images", str(s["bench_images"]),
           "--workers", str(s["workers"]), "--device", device, "--out-json", path,
           "--dir", os.path.join(ctx["work"], f"data_bench_{device}")]
    cmd += ["--classes", "2", "--repeats", "1", "--min-side", "64", "--max-side", "96", "--batch", "8"] \
        if ctx["smoke"] else ["--repeats", "3"]
    shutil.rmtree(os.path.join(ctx["work"], f"data_bench_{device}"), ignore_errors=True)
    os.makedirs(os.path.join(ctx["work"], f"data_bench_{device}"))
    rc, text = run_cmd(cmd, ctx["timeout"] - 5)
    if rc != 0:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        raise RuntimeError(f"bench/data_throughput.py exited {rc}: {(lines or [''])[-1][:400]}")
    if not os.path.isfile(path):
        raise RuntimeError(f"bench/data_throughput.py did not write --out-json {path}")
    with open(path) as f:
        return {"command": " ".join(cmd), "result": json.load(f)}


def part_data_bench_cuda(ctx) -> dict:
    if not _cuda(ctx):
        raise Skip("GPU decode path: no CUDA device")
    return _data_bench(ctx, "cuda")


def part_data_bench_cpu(ctx) -> dict:
    return _data_bench(ctx, "cpu")


def child_main(a) -> int:
    """Run one part; write {'status', 'result'|'error', 'traceback'} to a.result."""
    sys.path.insert(0, ROOT)
    sys.path.insert(0, BENCH)
    ctx = {"smoke": a.cpu_smoke, "device": "cpu" if a.cpu_smoke else "cuda", "work": a.work,
           "sizes": sizes(a.cpu_smoke), "timeout": a.timeout}
    rec = {}
    try:
        inject = [p for p in os.environ.get("SDLORA_GPU_CHECK_FAIL", "").split(",") if p]
        if a.run_part in inject:
            raise RuntimeError(f"failure injected by SDLORA_GPU_CHECK_FAIL={','.join(inject)}")
        result = globals()[f"part_{a.run_part}"](ctx)
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
def run_cmd(cmd: list, timeout: float, env=None) -> tuple:
    """(returncode, stdout+stderr); on timeout the whole process group is killed (accelerate's
    children too) and returncode is 124."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout))
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return 124, (out or "") + f"\n[timed out after {timeout:.0f} s]"


def preflight(smoke: bool) -> list:
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
              "sizes": sizes(smoke), "missing_packages": preflight(smoke), "parts": {}}
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
    timeout = min(part_budget, left)
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


def result_of(report: dict, name: str) -> dict:
    """A part's result dict, {} when the part failed before producing one (result None) or did not run."""
    r = (report.get("parts", {}).get(name) or {}).get("result")
    return r if isinstance(r, dict) else {}


def save_report(report: dict, out: str) -> None:
    """gpu_check.json, then gpu_check.md; each is written even if the other cannot be."""
    try:
        report["device"] = result_of(report, "env").get("device")
        report["targets"] = targets(report)
    except Exception as exc:  # noqa: BLE001 - recorded; the raw parts are still written
        report["targets"] = [{"target": "(could not be evaluated)", "goal": "", "measured": None, "met": None,
                              "note": f"{type(exc).__name__}: {exc}"}]
    tmp = os.path.join(out, "gpu_check.json.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(tmp, os.path.join(out, "gpu_check.json"))
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write("\n".join(markdown(report)) + "\n")


def summary_line(report: dict, out: str) -> str:
    """The last line printed: every failed part with its error, and where the report is."""
    parts = report["parts"]
    failed = [f"{n} ({(r.get('error') or '').splitlines()[0][:200] if r.get('error') else 'no error text'})"
              for n, r in parts.items() if r["status"] == "fail"]
    where = f"report: {os.path.join(out, 'gpu_check.json')} and gpu_check.md"
    if failed:
        return f"gpu_check: FAILED {len(failed)} of {len(parts)} part(s) in {report.get('total_s')} s: " \
               f"{'; '.join(failed)} | {where}"
    return f"gpu_check: {len(parts)} part(s) passed or skipped in {report.get('total_s')} s | {where}"


def targets(report: dict) -> list:
    """The issue's targets against what was measured (not evaluated in cpu-smoke mode)."""
    step = result_of(report, "step_timing").get("per_t") or {}
    t20 = step.get("20") or step.get(20) or {}
    e2e = result_of(report, "e2e_train")
    rows = [("step(T=20) / frozen step", "<= 1.05", t20.get("ours_over_frozen"), lambda v: v <= 1.05),
            ("per-task loop / ours at T=20", ">= 2", t20.get("loop_over_ours"), lambda v: v >= 2),
            ("ViT-B/16 bf16 img/s, step on a fixed batch (T=20)", ">= 4500", t20.get("ours_img_s"), lambda v: v >= 4500),
            ("ViT-B/16 bf16 img/s, end-to-end 2-task run", ">= 4500", e2e.get("img_s_steady"), lambda v: v >= 4500)]
    smoke = report["mode"] == "cpu-smoke"
    return [{"target": n, "goal": g, "measured": v,
             "met": None if (smoke or v is None) else bool(ok(v)),
             "note": "not evaluated: cpu-smoke (tiny shapes, no GPU)" if smoke else
             ("not measured (part failed or skipped)" if v is None else "")} for n, g, v, ok in rows]


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.3g}" if isinstance(v, float) and abs(v) < 100 else str(v))


def markdown(report: dict) -> list:
    """gpu_check.md's lines. Each section is rendered on its own: one that cannot be (a partial
    result) is replaced by a line saying why, and the others are still written."""
    md = []
    for section in (_md_parts, _md_targets, _md_kernel_compile, _md_kernel_correctness, _md_step, _md_op,
                    _md_throughput):
        try:
            md += section(report)
        except Exception as exc:  # noqa: BLE001 - the JSON holds the raw figures anyway
            md += ["", f"({section.__name__[4:]} section not rendered: {type(exc).__name__}: {exc})"]
    return md


def _md_parts(report: dict) -> list:
    p = report["parts"]
    env = result_of(report, "env")
    md = [f"# gpu_check ({report['mode']})", "",
          f"Device: {report.get('device') or '-'}; torch {env.get('torch', '-')}, triton {env.get('triton', '-')}; "
          f"started {report['started_utc']}; total {report.get('total_s')} s of a {report['total_budget_s']} s budget.",
          "", "| part | status | seconds | budget s | estimate s | note |", "|---|---|---|---|---|---|"]
    for name, r in p.items():
        note = (r.get("error") or r.get("reason") or "").replace("|", "/")[:300]
        skipped = result_of(report, name).get("skipped_variants")
        if skipped:
            note = (note + " " if note else "") + "skipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items())
        md.append(f"| {name} | {r['status']} | {_fmt(r.get('seconds'))} | {r['budget_s']} | {r['estimate_s']} | {note} |")
    return md


def _md_targets(report: dict) -> list:
    md = ["", "## Targets", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    for t in report.get("targets") or []:
        met = t["note"] if t["met"] is None else ("yes" if t["met"] else "**no**")
        md.append(f"| {t['target']} | {t['goal']} | {_fmt(t['measured'])} | {met} |")
    return md


def _md_kernel_compile(report: dict) -> list:
    kc = result_of(report, "kernel_compile")
    return ["", "## Kernels compiled by Triton's ptxas (registers, spills, shared memory)", "", kc["table"]] \
        if kc.get("table") else []


def _md_kernel_correctness(report: dict) -> list:
    md = []
    kc = result_of(report, "kernel_correctness").get("checks")
    if kc:
        md += ["", "## Kernel correctness (Triton vs reference, max |diff| / max |reference|)", "",
               "| compute / weights | passed | max rel diff | worst tensor | tolerance |", "|---|---|---|---|---|"]
        for k, r in kc.items():
            md.append(f"| {k} | {r['passed']} | {_fmt(r['max_rel_diff'])} | {r['worst']} | {r['tolerance']:.0e} |")
    return md


def _md_step(report: dict) -> list:
    md = []
    st = result_of(report, "step_timing")
    if st:
        md += ["", f"## Training step (ViT d={st['d']} x {st['layers']}, {st['image']} px, batch {st['batch']}, "
               f"amp {st['amp']}; ms, {st['stat']}; ours = {st['ours']}; frozen {_fmt(st['ms'].get('frozen'))} ms)", "",
               "| T | ours | reference impl | loop | ours/frozen | reference/frozen | loop/ours | triton/reference "
               "| ours/ours(T1) | img/s | peak MiB ours | peak MiB loop |", "|---" * 12 + "|"]
        for t, r in st["per_t"].items():
            md.append(f"| {t} | {_fmt(r.get('ours_ms'))} | {_fmt(r.get('ours_reference_ms'))} | {_fmt(r.get('loop_ms'))} "
                      f"| {_fmt(r.get('ours_over_frozen'))} | {_fmt(r.get('reference_over_frozen'))} "
                      f"| {_fmt(r.get('loop_over_ours'))} "
                      f"| {_fmt(r.get('triton_over_reference'))} | {_fmt(r.get('ours_over_ours_t1'))} "
                      f"| {_fmt(r.get('ours_img_s'))} | {_fmt(r.get('peak_mib_ours'))} | {_fmt(r.get('peak_mib_loop'))} |")
        for k, v in st.get("variant_failures", {}).items():
            md.append(f"\nvariant {k} failed: {v}")
    return md


def _md_op(report: dict) -> list:
    md = []
    op = result_of(report, "op_timing")
    if op:
        md += ["", f"## Stacked low-rank op ({op['tokens']} x {op['d']}, rank {op['rank']}, {op['dtype']}; ms)", "",
               "| T | plain | ours | reference impl | loop | ours/plain | loop/ours | triton/reference |",
               "|---|---|---|---|---|---|---|---|"]
        for t, r in op["per_t"].items():
            md.append(f"| {t} | {_fmt(r['plain_ms'])} | {_fmt(r['ours_ms'])} | {_fmt(r['ours_reference_ms'])} "
                      f"| {_fmt(r['loop_ms'])} | {_fmt(r['ours_over_plain'])} | {_fmt(r['loop_over_ours'])} "
                      f"| {_fmt(r['triton_over_reference'])} |")
    return md


def _md_throughput(report: dict) -> list:
    md = []
    rows = []
    e2e = result_of(report, "e2e_train")
    if e2e:
        rows.append(f"| e2e 2-task run (accelerate) | {_fmt(e2e.get('img_s_steady'))} steady, "
                    f"{_fmt(e2e.get('img_s_task_wall'))} incl. set-up/eval | {_fmt(e2e.get('wall_s'))} s wall |")
    ds = result_of(report, "data_shards")
    if ds:
        rows.append(f"| shard loader on that folder | {_fmt(ds['img_s'])} ({ds['workers']} workers) | |")
    for dev in ("cuda", "cpu"):
        r = result_of(report, f"data_bench_{dev}")
        if r:
            figures = {k: v for k, v in r["result"].items() if "ips" in k or "img_s" in k or "_over_" in k}
            rows.append(f"| bench/data_throughput.py --device {dev} | "
                        f"{', '.join(f'{k} {v}' for k, v in figures.items())} | |")
    if rows:
        md += ["", "## Throughput (img/s)", "", "| what | img/s | note |", "|---|---|---|", *rows]
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "runs", "gpu_check"),
                    help="output folder (default $OUT, else runs/gpu_check)")
    ap.add_argument("--cpu-smoke", action="store_true", default=os.environ.get("SDLORA_GPU_CHECK_CPU") == "1",
                    help="tiny shapes on the CPU, device-only variants skipped (also SDLORA_GPU_CHECK_CPU=1)")
    ap.add_argument("--only", default=None, help="comma-separated parts to run (e.g. to rerun what failed)")
    ap.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S, help="total time budget in seconds")
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
