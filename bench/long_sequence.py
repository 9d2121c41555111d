"""Hundreds of tasks (issue 27): step time, peak step memory and checkpoint cost at T = 1 ... 200.

ViT-B/16 width (d 768, 12 heads, MLP 3072; random weights, built from config), rank 10, one
process. Variants, each built at every T of --tasks:

- sdlora: the project's SDLoRAModel, T - 1 frozen directions of rank 10 + the current one;
- rr: SD-LoRA-RR, the paper's schedule [[0, 10], [4, 8], [8, 6]] extended (rank 6 from task 8 on);
- kd: SD-LoRA-KD with a fold rate of --kd-fold-rate (default 0.5: every other task's direction was
  folded, i.e. zeroed with inv_norm 0 in every projection, which is what model/kd.py leaves behind;
  the least-squares fit itself runs at task boundaries, not in a step, and is not timed here);
- loop: the per-task loop reference of bench/train_step.py (LoopLoRALinear) on the sdlora weights.

A step is bench/train_step.py's Runner.step (forward, cross-entropy on the current task's logits,
backward, SGD momentum step). Step times: process CPU time with 1 thread, the minimum over --rounds
interleaved rounds (every variant and T alternate inside a round, so drift hits them alike). Peak
step memory: train_step.peak_step_bytes (torch.profiler, max 'Total Allocated' during one step: what
a step adds on top of the weights and buffers already allocated). Ratios to T = 1 come from this one
run. Checkpoint: the trainer's model payload (checkpoint_parts.model_payload: structure + adapter state, the
frozen backbone excluded) written through checkpoint.Checkpoints (atomic folder, sha256 manifest) and
read back with torch.load + checkpoint_parts.load_model_payload, at --ckpt-layers blocks (12 = ViT-B); its size
on disk and wall-clock save/load times (minimum over --rounds).

Prints a table and ends with ONE JSON line; no assertions.

    python bench/long_sequence.py                          # CPU defaults (see --help)
    python bench/long_sequence.py --tasks 1 50 200         # the short version
    python bench/long_sequence.py --kd-fit-only --tasks 10 50 100 200   # SD-LoRA-KD's boundary fit
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import STATS, add_timing_args, device_name, setup_timing  # noqa: E402
from train_step import Runner, build_loop, build_ours, peak_step_bytes, timed  # noqa: E402
from sdlora_ds.checkpoint import Checkpoints, write_torch  # noqa: E402
from sdlora_ds.config import config_from_dict  # noqa: E402
from sdlora_ds.checkpoint_parts import load_model_payload, model_payload  # noqa: E402

RR_SCHEDULE = [[0, 10], [4, 8], [8, 6]]  # SD-LoRA-RR (paper); the last rank continues to task T - 1


def make_cfg(args, variant: str, layers: int):
    adapter = {"rank": args.rank, "impl": args.impl}
    if variant == "rr":
        adapter["rank_schedule"] = RR_SCHEDULE
    T = max(args.tasks)
    return config_from_dict({
        "name": "bench",
        "backbone": {"source": "config", "hidden_size": 768, "num_layers": layers, "num_heads": 12,
                     "mlp_size": 3072, "patch_size": 16, "image_size": args.image_size},
        "adapter": adapter,  # kd: built as sdlora, folds applied below (no least-squares fit at build time)
        "cil": {"num_classes": args.classes_per_task * T, "init_classes": args.classes_per_task,
                "increment": args.classes_per_task, "num_tasks": T},
        "data": {"index": "unused/index.json", "image_size": args.image_size, "test_resize": args.image_size},
    })


def fold_every(model, rate: float) -> int:
    """What SD-LoRA-KD leaves after folding a fraction `rate` of the frozen directions (tasks
    1, 3, 5, ... for rate 0.5; task 0 has nothing to fold into): zero factors, inv_norm 0."""
    folded = 0
    for t in range(1, model.layers[0].num_frozen):
        if int(t * rate) == int((t - 1) * rate):  # the fold decision of task t, at `rate` on average
            continue
        folded += 1
        for layer in model.layers:
            cols = layer.task_columns(t)
            layer.a_frozen[cols] = 0
            layer.b_frozen[:, cols] = 0
            layer.frozen_inv_norm[t] = 0
    return folded


def build(args, variant: str, t: int, layers: int):
    """The model of `variant` at task t - 1 (t tasks), trainable set as the trainer sets it."""
    cfg = make_cfg(args, "rr" if variant == "rr" else "sdlora", layers)
    model = build_ours(cfg, t, args.classes_per_task, "cpu")
    if variant == "kd":
        fold_every(model, args.kd_fold_rate)
    return model


def checkpoint_costs(args, variant: str, t: int, rounds: int) -> dict:
    """Size on disk, save and load wall-clock seconds of the model checkpoint at t tasks."""
    model = build(args, variant, t, args.ckpt_layers)

    class OneProcess:
        process_index, num_processes, is_main_process = 0, 1, True

        def wait_for_everyone(self):
            pass

    saves, loads, size = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            store = Checkpoints(os.path.join(tmp, f"r{r}"), keep=1, accelerator=OneProcess())
            t0 = time.perf_counter()
            path = store.save(f"step-{r:08d}-task{t - 1}-end", {"order": [r, 1], "task_end": t - 1},
                              {"model.pt": write_torch(model_payload(model, []))}, write_torch({}))
            saves.append(time.perf_counter() - t0)
            size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
            t0 = time.perf_counter()
            payload = torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=True)
            load_model_payload(model, payload, f"checkpoint {path!r}")
            loads.append(time.perf_counter() - t0)
            shutil.rmtree(store.root)
    return {"bytes": size, "save_s": min(saves), "load_s": min(loads)}


def kd_fit_costs(tasks: list, rank: int, clock) -> dict:
    """SD-LoRA-KD's boundary fit (model/kd.py fit_direction) of one 768 x 768 projection holding
    t - 1 earlier rank-`rank` directions, none folded: seconds on `clock`, the fitted count |P| and the
    float64 design matrix's bytes (d_out d_in |P| x 8). ViT-B runs it for 24 projections per boundary."""
    from torch import nn
    from sdlora_ds.model.kd import fit_direction
    from sdlora_ds.model.sdlora import Magnitudes, SDLoRALinear
    g, out = torch.Generator().manual_seed(0), {}
    for t in tasks:
        if t < 2:
            continue
        mags = Magnitudes()
        layer = SDLoRALinear(nn.Linear(768, 768), mags, impl="reference")
        for _ in range(t):
            mags.grow(1.0, True)
            layer.add_direction(rank, generator=g)
            layer.b_cur.data.normal_(0, 0.01, generator=g)
            layer.freeze_current()
        t0 = clock()
        prev, _, _ = fit_direction(layer, t - 1)
        out[t] = {"s": clock() - t0, "fitted": len(prev), "matrix_bytes": 768 * 768 * len(prev) * 8}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, nargs="+", default=[1, 10, 50, 100, 200])
    ap.add_argument("--variants", nargs="+", default=["sdlora", "rr", "kd", "loop"])
    ap.add_argument("--layers", type=int, default=2, help="transformer blocks for the step timings (ViT-B: 12)")
    ap.add_argument("--loop-layers", type=int, default=None,
                    help="blocks for the loop reference (default --layers); fewer keeps its high-T steps cheap")
    ap.add_argument("--ckpt-layers", type=int, default=12, help="blocks of the checkpointed model (12 = ViT-B)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=10)
    ap.add_argument("--classes-per-task", type=int, default=2)
    ap.add_argument("--kd-fold-rate", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ckpt-rounds", type=int, default=2)
    ap.add_argument("--impl", default="auto", choices=["auto", "reference", "triton"])
    ap.add_argument("--kd-fit-only", action="store_true",
                    help="time only SD-LoRA-KD's boundary fit of one ViT-B projection at each T (no steps)")
    add_timing_args(ap)
    args = ap.parse_args()
    assert args.device == "cpu", "this benchmark builds CPU models (bench/gpu_check.sh times the GPU)"
    clock = setup_timing(args)
    started = time.process_time()
    if args.kd_fit_only:
        fits = kd_fit_costs(args.tasks, args.rank, clock)
        print(f"SD-LoRA-KD boundary fit of one 768 x 768 projection, {device_name('cpu')}, {args.clock} clock")
        for t, f in fits.items():
            print(f"  T={t}: {f['s']:.2f} s, {f['fitted']} directions fitted, design matrix "
                  f"{f['matrix_bytes'] / 1e6:.0f} MB (float64); x24 projections per ViT-B boundary")
        print(json.dumps({"bench": "long_sequence_kd_fit", "device": device_name("cpu"), "clock": args.clock,
                          "rank": args.rank, "kd_fit_one_projection": {f"t{t}": {**f, "s": round(f["s"], 3)}
                                                                       for t, f in fits.items()}}))
        return
    g = torch.Generator().manual_seed(0)
    batch = (torch.rand(args.batch, 3, args.image_size, args.image_size, generator=g),
             torch.randint(0, args.classes_per_task, (args.batch,), generator=g))
    loop_layers = args.loop_layers or args.layers
    runners, frozen_cols = {}, {}
    for t in args.tasks:
        for v in args.variants:
            if v == "loop":
                ours = build(args, "sdlora", t, loop_layers)
                model, params = build_loop(ours)
                del ours
            else:
                model = build(args, v, t, args.layers)
                params = model.trainable_parameters()
                frozen_cols[(v, t)] = model.layers[0].a_frozen.shape[0]
            runners[(v, t)] = Runner(model, params, model.known_classes, batch, "cpu")
    times = {k: [] for k in runners}
    for r in range(args.rounds + 1):  # round 0 warms up and is dropped
        for key, runner in runners.items():
            dt = timed(runner.step, "cpu", clock)
            if r:
                times[key].append(dt)
    ms = {k: STATS[args.stat](v) * 1e3 for k, v in times.items()}
    peak = {k: peak_step_bytes(runner) for k, runner in runners.items()}
    del runners
    ckpt = {(v, t): checkpoint_costs(args, v, t, args.ckpt_rounds)
            for t in args.tasks for v in args.variants if v != "loop"}

    t1 = min(args.tasks)
    print(f"long sequences: ViT-B width (d 768), {args.layers} blocks ({loop_layers} for the loop), "
          f"{args.image_size} px, batch {args.batch}, rank {args.rank}, {device_name('cpu')}, {args.stat} of "
          f"{args.rounds} interleaved rounds, {args.clock} clock; checkpoints of {args.ckpt_layers} blocks")
    print(f"{'variant':>7} {'T':>4} {'R_f':>5} {'step ms':>9} {'x T1':>6} {'peak MiB':>9} {'x T1':>6} "
          f"{'ckpt MB':>8} {'save s':>7} {'load s':>7}")
    for v in args.variants:
        for t in args.tasks:
            c = ckpt.get((v, t))
            cells = f"{c['bytes'] / 1e6:8.1f} {c['save_s']:7.3f} {c['load_s']:7.3f}" if c else ""
            print(f"{v:>7} {t:>4} {frozen_cols.get((v, t), ''):>5} {ms[(v, t)]:9.1f} {ms[(v, t)] / ms[(v, t1)]:6.3f} "
                  f"{peak[(v, t)] / 2**20:9.1f} {peak[(v, t)] / max(peak[(v, t1)], 1):6.3f} {cells}")
    result = {
        "bench": "long_sequence", "device": device_name("cpu"), "d": 768, "layers": args.layers,
        "loop_layers": loop_layers, "ckpt_layers": args.ckpt_layers, "image_size": args.image_size,
        "batch": args.batch, "rank": args.rank, "rr_schedule": RR_SCHEDULE, "kd_fold_rate": args.kd_fold_rate,
        "rounds": args.rounds, "stat": args.stat, "clock": args.clock, "impl": args.impl,
        "ms": {f"{v}_t{t}": round(x, 1) for (v, t), x in ms.items()},
        "step_over_t1": {f"{v}_t{t}": round(x / ms[(v, t1)], 3) for (v, t), x in ms.items()},
        "peak_step_mib": {f"{v}_t{t}": round(b / 2**20, 2) for (v, t), b in peak.items()},
        "peak_over_t1": {f"{v}_t{t}": round(b / max(peak[(v, t1)], 1), 3) for (v, t), b in peak.items()},
        "frozen_columns": {f"{v}_t{t}": n for (v, t), n in frozen_cols.items()},
        "checkpoint": {f"{v}_t{t}": {"mb": round(c["bytes"] / 1e6, 2), "save_s": round(c["save_s"], 3),
                                     "load_s": round(c["load_s"], 3)} for (v, t), c in ckpt.items()},
        "cpu_seconds_total": round(time.process_time() - started, 1),
        "peak_mem_method": "torch.profiler profile_memory: max 'Total Allocated' during one step",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
