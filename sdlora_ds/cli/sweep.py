"""Run every config x seed into one folder: `sdlora-sweep --configs configs/a.json configs/b.json
--seeds 1993 1994 1995 --out runs/sweep_X [--nproc 1] [--accelerate-config launch/accelerate_cpu.yaml]
[--set key=value ...] [--dry-run]`.

Each (config, seed) is one run of launch/train.py through `accelerate launch`, in its own folder
`<out>/<config name>__s<seed>`, with BOTH seeds set from the seed: `seed` (initialisation, data
order, augmentation) and `cil.order_seed` (the class order), so a seed varies everything a seed
can vary. --set overrides go to every run (the sweep sets seed, cil.order_seed, name and
output_dir itself). Every config and override is validated before the first run starts.

- a run whose results.json is finished (and was made by the same config) is skipped;
- any other run is started with `--resume auto` (continues from its newest complete checkpoint,
  or starts fresh), so re-running the same command completes an interrupted sweep;
- each run's output goes to `<out>/logs/<run>.log` (--show-output also streams it); one progress
  line per run with its wall time and the sweep's elapsed time;
- `<out>/sweep.json` (rewritten after every run) records the commands, statuses, exit codes and
  wall times; a failed run does not stop the sweep, and the sweep exits 1 listing the failed runs.

--launcher replaces the `python -m accelerate.commands.launch --config_file ... --num_processes N`
prefix (e.g. a cluster wrapper; the tests use a fake). Compare the results with `sdlora-report`.
The runs use the checkout's launch/train.py and launch/accelerate_cpu.yaml, found from this package's
location (`pip install -e .`), so `sdlora-sweep` works from any folder.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

from sdlora_ds.config import apply_override, config_to_dict, load_config
from sdlora_ds.config_fields import NON_COMPUTING
from sdlora_ds.errors import run_cli
from sdlora_ds.fileio import atomic_write_json
from sdlora_ds.logger import flatten

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "launch")
TRAIN = os.path.join(LAUNCH, "train.py")  # the checkout's (sdlora_ds/cli/ -> the checkout's root -> launch/)
SWEEP_SETS = ("seed", "cil.order_seed", "name", "output_dir")


@dataclass
class Job:
    """One (config, seed) run."""
    config_path: str
    seed: int
    name: str
    run_dir: str
    sets: list       # every --set of the run, the sweep's last
    config: dict     # the resolved config train.py will run
    explicit: list   # dotted fields the config file or a --set gives (not left to a default)


def plan(configs: list[str], seeds: list[int], out: str, user_sets: list[str]) -> list[Job]:
    """Resolve and validate every run before any starts (ValueError on a bad config or override)."""
    for s in user_sets:
        key = s.split("=", 1)[0].strip()
        if key in SWEEP_SETS:
            raise ValueError(f"--set {s!r}: the sweep sets {', '.join(SWEEP_SETS)} itself (use --seeds / --out)")
    if not configs or not seeds:
        raise ValueError("give at least one --configs file and one --seeds value")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {seeds}: a seed is listed twice")
    jobs: list[Job] = []
    names: dict[str, str] = {}
    for path in configs:
        base = load_config(path, user_sets).name
        if base in names:
            raise ValueError(f"configs {names[base]!r} and {path!r} have the same name {base!r}; their runs would "
                             f"share folders: rename one (its 'name' field)")
        names[base] = path
        for seed in seeds:
            name = f"{base}__s{seed}"
            sets = list(user_sets) + [f"seed={seed}", f"cil.order_seed={seed}", f"name={json.dumps(name)}",
                                      f"output_dir={json.dumps(out)}"]
            cfg = config_to_dict(load_config(path, sets))
            jobs.append(Job(path, seed, name, os.path.join(out, name), sets, cfg, _explicit(path, sets)))
    return jobs


def _explicit(path: str, sets: list[str]) -> list[str]:
    with open(path) as f:  # load_config above has already checked it
        raw = json.load(f)
    for s in sets:
        apply_override(raw, s)
    return sorted(flatten(raw))


def run_status(job: Job) -> str:
    """'done' (finished results.json of this config), 'resume' (checkpoints present) or 'new'.
    A results.json of another config is refused: skipping it would report the wrong setting. The
    comparison covers the fields the config file and the overrides give; fields left to a default
    may be filled in by the trainer (e.g. the backbone's shape from its weights)."""
    path = os.path.join(job.run_dir, "results.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                res = json.load(f)
            old, acc = flatten(res["config"]), res["acc_matrix"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return "resume"  # unreadable: run it again (train.py resumes from its checkpoints)
        new = flatten(job.config)
        diff = [k for k in job.explicit if k in old and k in new and k not in NON_COMPUTING and old[k] != new[k]]
        if diff:
            raise ValueError(f"{path} was made by another config (field {diff[0]!r}: {old[diff[0]]!r}, the sweep "
                             f"now gives {new[diff[0]]!r}); use another --out or delete {job.run_dir}")
        if len(acc) == job.config["cil"]["num_tasks"]:
            return "done"
    ck = os.path.join(job.run_dir, "checkpoints")
    return "resume" if os.path.isdir(ck) and os.listdir(ck) else "new"


def default_launcher(accelerate_config: str, nproc: int) -> list[str]:
    """`accelerate launch` through the sweep's own Python (no PATH lookup: the venv's accelerate)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config,
            "--num_processes", str(nproc)]


def command(job: Job, launcher: list[str], train: str = TRAIN) -> list[str]:
    sets = [a for s in job.sets for a in ("--set", s)]
    return [*launcher, train, "--config", job.config_path, *sets, "--resume", "auto"]


def _write_json(path: str, obj) -> None:
    atomic_write_json(path, obj, indent=1)  # a sweep killed mid-write leaves the previous complete record


def _clock(s: float) -> str:
    m, s = divmod(int(round(s)), 60)
    return f"{m // 60}h{m % 60:02d}m{s:02d}s" if m >= 60 else f"{m}m{s:02d}s"


def run_sweep(jobs: list[Job], launcher: list[str], out: str, *, dry_run: bool = False, show_output: bool = False,
              echo=print, train: str = TRAIN) -> dict:
    """Run (or, dry_run, list) every job; returns the sweep record (also written to out/sweep.json)."""
    record = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "out": out, "launcher": launcher, "runs": []}
    t0 = time.time()
    if not dry_run:
        os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    for i, job in enumerate(jobs):
        tag = f"[{i + 1}/{len(jobs)}] {job.name}"
        cmd = command(job, launcher, train)
        status = run_status(job)
        entry = {"name": job.name, "config": job.config_path, "seed": job.seed, "run_dir": job.run_dir,
                 "command": cmd, "before": status}
        record["runs"].append(entry)
        if dry_run:
            echo(f"{tag}: {'skip (finished)' if status == 'done' else status}: {shlex.join(cmd)}")
            continue
        if status == "done":
            entry.update(status="skipped", returncode=None, wall_s=0.0)
            echo(f"{tag}: finished earlier, skipped (elapsed {_clock(time.time() - t0)})")
        else:
            log = os.path.join(out, "logs", f"{job.name}.log")
            echo(f"{tag}: {'resuming' if status == 'resume' else 'starting'} (log: {log})")
            entry.update(status="running", log=log)  # what a sweep killed now leaves in sweep.json
            _write_json(os.path.join(out, "sweep.json"), record)
            start = time.time()
            rc = _run(cmd, log, show_output)
            wall = time.time() - start
            try:
                after = run_status(job) if rc == 0 else None
            except ValueError as e:  # finished, but its results.json records another config
                after = str(e)
            ok = after == "done"
            entry.update(status="ok" if ok else "failed", returncode=rc, wall_s=round(wall, 2), log=log)
            why = "" if ok else (f", exit code {rc}" if rc else
                                 ", exit code 0 but " + (after if after not in ("new", "resume")
                                                         else "no finished results.json"))
            echo(f"{tag}: {'ok' if ok else 'FAILED'} in {_clock(wall)}{why} (elapsed {_clock(time.time() - t0)})")
            if not ok:
                echo(_tail(log))
        record["wall_s"] = round(time.time() - t0, 2)
        _write_json(os.path.join(out, "sweep.json"), record)
    record["wall_s"] = round(time.time() - t0, 2)
    if not dry_run:
        _write_json(os.path.join(out, "sweep.json"), record)
    return record


def _run(cmd: list[str], log: str, show_output: bool) -> int:
    with open(log, "ab") as f:
        f.write(f"$ {shlex.join(cmd)}\n".encode())
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in proc.stdout:  # the log gets everything; the terminal only with --show-output
            f.write(line)
            if show_output:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
        return proc.wait()


def _tail(log: str, n: int = 15) -> str:
    with open(log, errors="replace") as f:
        lines = f.read().splitlines()[-n:]
    return "\n".join("    | " + ln for ln in lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="run configs x seeds through accelerate launch into one folder")
    ap.add_argument("--configs", nargs="+", required=True, help="run configs (configs/*.json)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1993, 1994, 1995],
                    help="each sets both seed and cil.order_seed (default: 1993 1994 1995)")
    ap.add_argument("--out", required=True, help="sweep folder: one run folder per config x seed, sweep.json, logs/")
    ap.add_argument("--nproc", type=int, default=1, help="processes per run (accelerate --num_processes)")
    ap.add_argument("--accelerate-config", default=os.path.join(LAUNCH, "accelerate_cpu.yaml"),
                    help="accelerate config file (launch/*.yaml)")
    ap.add_argument("--launcher", default=None,
                    help="command prefix that runs launch/train.py instead of accelerate launch (shell-split)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    ap.add_argument("--dry-run", action="store_true", help="print each run's status and command, run nothing")
    ap.add_argument("--show-output", action="store_true", help="stream the runs' output (always in logs/)")
    return run_cli(_sweep, ap.parse_args(argv))


def _sweep(a) -> int:
    if a.nproc < 1:
        raise ValueError(f"--nproc {a.nproc}: must be >= 1")
    if a.launcher is None and not os.path.isfile(a.accelerate_config):
        raise ValueError(f"--accelerate-config {a.accelerate_config!r} does not exist (see launch/*.yaml)")
    if not os.path.isfile(TRAIN):
        raise ValueError(f"{TRAIN} not found: sdlora-sweep runs the checkout's launch/train.py; install the "
                         "package from a checkout with `pip install -e .`")
    launcher = shlex.split(a.launcher) if a.launcher else default_launcher(a.accelerate_config, a.nproc)
    jobs = plan(a.configs, a.seeds, a.out, a.set)
    for j in jobs:
        run_status(j)  # a folder holding another config's results stops the sweep before any run
    record = run_sweep(jobs, launcher, a.out, dry_run=a.dry_run, show_output=a.show_output)
    if a.dry_run:
        return 0
    counts = {s: sum(r["status"] == s for r in record["runs"]) for s in ("ok", "skipped", "failed")}
    print(f"sweep: {counts['ok']} ran, {counts['skipped']} skipped, {counts['failed']} failed in "
          f"{_clock(record['wall_s'])}; record: {os.path.join(a.out, 'sweep.json')}")
    failed = [r for r in record["runs"] if r["status"] == "failed"]
    if failed:
        print("failed runs:\n" + "\n".join(f"  {r['name']} (exit code {r['returncode']}, log {r['log']})"
                                           for r in failed), file=sys.stderr)
        return 1
    print(f"compare: sdlora-report --runs {a.out} --out docs/<name>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
