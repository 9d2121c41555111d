"""The full-size ZeRO memory table: ViT-B/16, ViT-L/16 and DINOv2-g/14 at full width and depth (random
weights) on 1, 2 and 4 CPU processes (gloo, fp32), ZeRO-2 and ZeRO-3 (built under deepspeed.zero.Init),
one bench/zero_memory.py run per cell, one at a time, smallest first.

Each cell trains the last of the plan's 5 tasks (rank 10, 40 classes each; the 4 earlier tasks' frozen
directions are buffers) on one image per rank at a 4 x 4 patch grid (64 px for /16, 56 px for /14:
17 tokens), two steps, the second measured. Per rank it records the parameter bytes held, adapter
gradient + optimizer bytes, and the peak allocated bytes of the measured step (zero_memory.py's
docstring says how each is counted), and beside them the memory plan of the matching config
(sdlora_ds/plan.py, the numbers `launch/train.py --config C --plan` prints with the overrides in
PLAN_SET) for the same processes, stage, image size, micro-batch 1 and fp32.

Memory is the limit on a small machine: before each cell the plan's total per rank plus RUNTIME_GIB of
Python runtime per process, times the processes, is the cell's estimate; the cell runs only if the
estimate plus --margin-gib is below MemAvailable, else its line says "not run" with both numbers. Each
cell's record is appended to --out as it finishes (a re-run skips the cells already there), and the
table and the ratios to 1 process are printed from that file:

    python bench/zero_memory_full.py                      # every cell; prints the table
    python bench/zero_memory_full.py --table-only         # the table of what --out holds
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from zero_memory import MiB  # noqa: E402

GiB = 1 << 30
RUNTIME_GIB = 1.0  # Python + torch + DeepSpeed per process before any model (measured max_rss: ~0.9 GiB)
CONFIGS = {"vit_b16": "imagenetr_b40.json", "vit_l16": "imagenetr_b40_vitl16.json",
           "dinov2_g14": "imagenetr_b40_dinov2_g14.json"}
TASKS = 5


def image_size(backbone: str) -> int:
    """A 4 x 4 patch grid: the smallest input that keeps every block's shapes full-size."""
    return 4 * (14 if backbone.startswith("dinov2") else 16)


def plan_overrides(size: int, world: int) -> list:
    """The --set overrides that make the config's plan the benchmark's setting."""
    return ['dist.mixed_precision="no"', f"data.image_size={size}", f"data.test_resize={size}",
            f"backbone.image_size={size}", f"optim.global_batch={world}"]


def plan_of(backbone: str, stage: int, world: int, depth=None, prefetch_bucket=None) -> dict:
    """The plan's per-GPU rows (bytes) for the cell: `launch/train.py --config configs/<C> --plan
    --num_processes <world> --zero-stage <stage>` with plan_overrides (and the cell's prefetch bucket,
    None: the launch file's)."""
    from sdlora_ds.config import load_config
    from sdlora_ds.plan import Setting, make_plan
    sets = plan_overrides(image_size(backbone), world) + ([f"backbone.num_layers={depth}"] if depth else [])
    cfg = load_config(os.path.join(ROOT, "configs", CONFIGS[backbone]), sets)
    p = make_plan(cfg, Setting(num_processes=world, zero_stage=stage, prefetch_bucket=prefetch_bucket))
    assert p.micro == 1 and p.accum == 1, (p.micro, p.accum)
    return {**p.rows, "total": p.total, "activations kept": p.activations["kept"], "backbone params": p.arch.params}


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def estimate(plan: dict, world: int, stage: int, params: int, bounded: bool) -> int:
    """Bytes the cell needs on the machine, all processes together: per process the plan's total and the
    runtime, and under ZeRO-3 on several processes the gathered copies beyond the plan's working set:
    with the launch file's prefetch and reuse distance up to the whole fp32 model (kept gathered between
    forward and backward, measured 0.57x of ViT-B at its peak) twice (DeepSpeed copies each tensor out of
    the flat buffer its all-gather fills, and both live until the bucket is done); with both bounded
    (bounded=True), twice the plan's working set."""
    gathered = 0
    if stage == 3 and world > 1:
        gathered = 2 * plan["gathered layers + prefetch"] if bounded else 2 * 4 * params
    return world * int(plan["total"] + gathered + RUNTIME_GIB * GiB)


def run_cell(backbone: str, stage: int, world: int, depth=None, ds=None) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, "bench", "zero_memory.py"), "--backbone", backbone, "--world",
           str(world), "--stages", str(stage), "--image-size", str(image_size(backbone)), "--tasks", str(TASKS)]
    cmd += (["--zero-init"] if stage == 3 else []) + (["--depth", str(depth)] if depth else [])
    for key, value in (ds or {}).items():
        cmd += [f"--{key.replace('_', '-')}", str(value)] if value is not None else []
    t0 = time.time()
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    res = json.loads(done.stdout.strip().splitlines()[-1])
    return {"ranks": res["bytes_per_rank"][str(stage)], "model_params": res["model_params"],
            "trainable_params": res["trainable_params"], "wall_s": round(time.time() - t0, 1),
            "command": " ".join(cmd[1:])}


def read(path: str) -> list:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def malloc_env() -> dict:
    """glibc's MALLOC_MMAP_THRESHOLD_ when set (the cells inherit it). Without it glibc raises its mmap
    threshold as large blocks are freed, and later freed tensors stay in the heap: max RSS of a ZeRO-3
    rank on 2 processes was ~2.6x the whole fp32 model above the runtime (ViT-B, ViT-L). With 1048576,
    4 blocks of DINOv2-g width on 2 processes: 2.2 -> 1.2 GiB per rank, ~the runtime + the counted peak.
    The counted bytes (params, peak) do not depend on it; max_rss does."""
    value = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    return {"malloc_mmap_threshold": int(value)} if value else {}


DS_KEYS = ("prefetch_bucket", "reuse_distance")  # zero_memory.py's --prefetch-bucket, --reuse-distance
DS_DEFAULTS = {"prefetch_bucket": ("stage3_prefetch_bucket_size", 50_000_000),  # DeepSpeed's defaults
               "reuse_distance": ("stage3_max_reuse_distance", 1_000_000_000)}


def file_ds() -> dict:
    """The ZeRO-3 gathering settings launch/ds_zero3.json gives (DeepSpeed's default where it names none):
    what a cell without --prefetch-bucket / --reuse-distance runs with, recorded explicitly."""
    from sdlora_ds.plan import _ds_file_value  # the plan reads the launch file the same way
    return {k: _ds_file_value(3, False, name, default) for k, (name, default) in DS_DEFAULTS.items()}


def ds_of(rec: dict) -> tuple:
    return tuple(rec.get(k) for k in DS_KEYS)


def sweep(backbones, stages, worlds, out: str, margin_gib: float, depth=None, ds=None) -> None:
    """ds: {"prefetch_bucket": elements or None, "reuse_distance": ...} for the ZeRO-3 cells (None: the file's,
    recorded as its value)."""
    given, from_file = ds or {}, file_ds()
    ds = {k: given[k] if given.get(k) is not None else from_file[k] for k in DS_KEYS}
    done = {(r["backbone"], r["stage"], r["world"], ds_of(r)) for r in read(out)}
    for backbone in backbones:
        for stage in stages:
            for world in worlds:
                cell_ds = ds if stage == 3 else {k: None for k in DS_KEYS}
                if (backbone, stage, world, ds_of(cell_ds)) in done:
                    continue
                plan = plan_of(backbone, stage, world, depth, cell_ds["prefetch_bucket"] if stage == 3 else None)
                # measured: only bucket 0 + reuse 0 gather one module at a time; with a bucket the
                # forward's gathered layers wait for their backward whatever the reuse distance
                bounded = cell_ds["prefetch_bucket"] == 0 and cell_ds["reuse_distance"] == 0
                need, avail = estimate(plan, world, stage, plan["backbone params"], bounded), mem_available()
                rec = {"backbone": backbone, "stage": stage, "world": world, "depth": depth,
                       "image_size": image_size(backbone), "batch_per_rank": 1, "tasks": TASKS, "plan": plan,
                       "estimate": need, "available": avail, "threads_per_process": 1,
                       **cell_ds, **malloc_env()}
                if need + margin_gib * GiB > avail:
                    rec["status"] = "not run"
                else:
                    print(f"{backbone} ZeRO-{stage} x{world}: estimate {need / GiB:.1f} GiB of "
                          f"{avail / GiB:.1f} available", flush=True)
                    rec.update(status="run", **run_cell(backbone, stage, world, depth, cell_ds))
                with open(out, "a") as f:
                    f.write(json.dumps(rec) + "\n")


def cell_figures(rec: dict) -> dict:
    """The largest value over ranks of each figure (the rank that decides what fits); the peak and its
    parts (step_peak, gathered_at_peak) of one rank, the one with the largest peak."""
    ranks = rec["ranks"]
    keys = ("params", "grads", "optimizer", "resident", "buffers", "max_rss")
    top = max(ranks, key=lambda r: r["peak"])
    return {**{k: max(r[k] for r in ranks) for k in keys},
            **{k: top[k] for k in ("peak", "step_peak", "gathered_at_peak")}}


def rss_mark(rec: dict) -> str:
    """Beside max RSS: the cell ran with MALLOC_MMAP_THRESHOLD_ set (malloc_env), in bytes."""
    value = rec.get("malloc_mmap_threshold")
    return f" (mmap {value:,})" if value else ""


def table(records: list) -> str:
    def key(r):
        return r["backbone"], r["stage"], ds_of(r)
    one = {key(r): cell_figures(r) for r in records if r["status"] == "run" and r["world"] == 1}
    head = (f"| backbone | ZeRO | procs | params MiB (x1) | adapter grads + optimizer MiB (x1) | peak MiB (x1) | "
            f"of peak: gathered / step's other | max RSS MiB | plan total MiB | peak / plan |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        bounds = ", ".join(f"{k.split('_')[0]} {v:,}" for k, v in zip(DS_KEYS, ds_of(r)) if v is not None)
        name = f"| {r['backbone']} | {r['stage']}{f' ({bounds})' if bounds else ''} | {r['world']} |"
        # today's plan for the cell's setting and prefetch bucket (the record keeps the one made at run time)
        plan_total = plan_of(r["backbone"], r["stage"], r["world"], r.get("depth"),
                             r.get("prefetch_bucket") if r["stage"] == 3 else None)["total"]
        if r["status"] != "run":
            lines.append(f"{name} not run: needs ~{r['estimate'] / GiB:.1f} GiB (estimate) + margin, "
                         f"{r['available'] / GiB:.1f} GiB available on this machine | | | | | "
                         f"{plan_total / MiB:,.0f} | |")
            continue
        f, base = cell_figures(r), one.get(key(r))

        f["adapter"] = f["grads"] + f["optimizer"]
        if base:
            base["adapter"] = base["grads"] + base["optimizer"]

        def ratio(k):
            return f" ({f[k] / base[k]:.3f}x)" if base and base[k] else ""
        lines.append(f"{name} {f['params'] / MiB:,.1f}{ratio('params')} | {f['adapter'] / MiB:.2f}{ratio('adapter')}"
                     f" | {f['peak'] / MiB:,.1f}{ratio('peak')} | {f['gathered_at_peak'] / MiB:,.1f} / "
                     f"{(f['step_peak'] - f['gathered_at_peak']) / MiB:,.1f} | "
                     f"{f['max_rss'] / MiB:,.0f}{rss_mark(r)} | "
                     f"{plan_total / MiB:,.0f} | {f['peak'] / plan_total:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="vit_b16,vit_l16,dinov2_g14")
    ap.add_argument("--stages", default="2,3")
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--depth", type=int, default=None, help="keep the first N blocks (tests; the table is full depth)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "zero_memory_full.jsonl"))
    ap.add_argument("--margin-gib", type=float, default=3.0, help="memory left free besides the estimate")
    ap.add_argument("--prefetch-bucket", type=int, default=None,
                    help="ZeRO-3 stage3_prefetch_bucket_size for the ZeRO-3 cells (default: launch/ds_zero3.json's)")
    ap.add_argument("--reuse-distance", type=int, default=None,
                    help="ZeRO-3 stage3_max_reuse_distance for the ZeRO-3 cells (default: launch/ds_zero3.json's)")
    ap.add_argument("--table-only", action="store_true", help="print the table of --out, run nothing")
    args = ap.parse_args(argv)
    backbones = args.backbones.split(",")
    unknown = [b for b in backbones if b not in CONFIGS]
    if unknown:
        ap.error(f"--backbones: unknown {unknown}; choose from {sorted(CONFIGS)}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if not args.table_only:
        sweep(backbones, [int(s) for s in args.stages.split(",")], [int(w) for w in args.worlds.split(",")],
              args.out, args.margin_gib, args.depth,
              {"prefetch_bucket": args.prefetch_bucket, "reuse_distance": args.reuse_distance})
    print(table(read(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
