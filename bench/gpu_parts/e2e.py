"""shards and e2e_train parts: synthetic 224-px JPEG shards, then a 2-task `accelerate launch` run on
them, img/s from the TensorBoard step wall times."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

from .common import on_cuda, run_cmd, shard_index


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
    index = shard_index(ctx)
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
    accel = ["--config_file", os.path.join("launch", "accelerate_1gpu.yaml")] if on_cuda(ctx) else \
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
