"""Hundreds of tasks end to end (issue 27): a class-incremental run of 2-class tasks on a tiny
random ViT trains, evaluates after every task and checkpoints at every task end; a copy of it is
SIGKILLed (a real process, `launch/train.py`) once task K's checkpoint exists and resumed with
--resume auto: results.json, metrics.jsonl and TensorBoard equal the uninterrupted run's.

Default CI: 20 tasks, killed after task 15's checkpoint. Slow: 200 tasks, killed after task 150;
it also prints what grows with T (results.json sections, TensorBoard, checkpoints, evaluation time
per image: docs/long_sequences.md)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, tiny_config_dict
from data_fixtures import write_id_shards
from test_checkpoint import assert_same_logs, comparable
from test_distributed import kill_tree, tail
from sdlora_ds.config import config_from_dict

TRAIN_PER_CLASS, TEST_PER_CLASS = 4, 2


def long_run_config(tmp, tasks: int, out) -> tuple:
    """(config, raw dict): `tasks` tasks of 2 classes, one optimizer step of 8 images each, on 16 px
    generated images (tests/data_fixtures.py) and a one-block ViT of width 16."""
    classes = 2 * tasks
    index = os.path.join(tmp, "shards", "index.json")
    if not os.path.exists(index):
        per_shard = 20  # classes per shard
        layout = {split: [[(c, n) for c in range(s, min(s + per_shard, classes))] for s in range(0, classes, per_shard)]
                  for split, n in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS))}
        write_id_shards(os.path.join(tmp, "shards"), layout, classes)
    raw = tiny_config_dict(index=index, name="long", output_dir=str(out),
                           backbone={"hidden_size": 16, "num_layers": 1, "num_heads": 2, "mlp_size": 32,
                                     "patch_size": 8, "image_size": 16},
                           adapter={"rank": 2},
                           cil={"num_classes": classes, "init_classes": 2, "increment": 2, "num_tasks": tasks},
                           data={"image_size": 16, "test_resize": 16, "interpolation": "nearest",
                                 "train_scale": [1.0, 1.0], "train_ratio": [1.0, 1.0], "shuffle_buffer": 50},
                           optim={"epochs": 1, "global_batch": 8, "max_steps_per_epoch": 1},
                           train={"eval_batch": 256, "probe_size": 4, "keep_checkpoints": 2, "log_every": 1})
    return config_from_dict(raw), raw


def timed_trainer():
    """A Trainer that records its own evaluation and checkpoint-save times (seconds, images)."""
    from sdlora_ds.trainer import Trainer

    class Timed(Trainer):
        timings: dict

        def evaluate(self, t):
            start = time.perf_counter()
            super().evaluate(t)
            images = self.index.count(self.cfg.data.test_split, self.schedule.seen_classes(t))
            self.timings.setdefault("eval", []).append((t, time.perf_counter() - start, images))

        def save_checkpoint(self, task_end=None):
            start = time.perf_counter()
            path = super().save_checkpoint(task_end)
            self.timings.setdefault("save", []).append(time.perf_counter() - start)
            return path

    Timed.timings = {}
    return Timed


def kill_after_task(cfg_path: str, run_dir: str, task: int, log: str, timeout: float) -> None:
    """Run launch/train.py and SIGKILL it once task `task`'s end checkpoint is complete (the
    checkpoint folder appears by an atomic rename)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the reference's thread count
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", cfg_path],
                            cwd=ROOT, env=env, stdout=open(log + ".out", "w"), stderr=open(log + ".err", "w"))
    ckpts, end = os.path.join(run_dir, "checkpoints"), time.time() + timeout
    try:
        # '.tmp-step-...-taskK-end' is that checkpoint still being written
        while not (os.path.isdir(ckpts) and any(n.endswith(f"-task{task}-end") and not n.startswith(".")
                                                for n in os.listdir(ckpts))):
            assert proc.poll() is None, f"the run ended before task {task}'s checkpoint\n{tail(log)}"
            assert time.time() < end, f"no task {task} checkpoint within {timeout} s\n{tail(log)}"
            time.sleep(0.05)
    finally:
        kill_tree(proc, signal.SIGKILL)


def sizes(run_dir: str) -> dict:
    """Bytes on disk of what grows with T: results.json (and its largest sections), the TensorBoard
    event files, metrics.jsonl, one checkpoint."""
    def du(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    res_path = os.path.join(run_dir, "results.json")
    res = json.load(open(res_path))
    sections = {k: len(json.dumps(v)) for k, v in res.items()}
    ckpts = os.path.join(run_dir, "checkpoints")
    last = sorted(os.listdir(ckpts))[-1]
    return {"results_json": os.path.getsize(res_path),
            "results_sections": dict(sorted(sections.items(), key=lambda kv: -kv[1])[:6]),
            "tensorboard": du(os.path.join(run_dir, "tensorboard")),
            "metrics_jsonl": os.path.getsize(os.path.join(run_dir, "metrics.jsonl")),
            "checkpoint": du(os.path.join(ckpts, last))}


def killed_and_resumed_equals_uninterrupted(tmp_path, tasks: int, kill_after: int, timeout: float) -> dict:
    from sdlora_ds.trainer import Trainer
    Timed = timed_trainer()
    ref_cfg, _ = long_run_config(tmp_path, tasks, tmp_path / "ref")
    ref = Timed(ref_cfg).run()
    assert len(ref["acc_matrix"]) == tasks and len(ref["acc_all"]) == tasks  # evaluated after every task
    assert len(Timed.timings["save"]) == tasks  # a checkpoint at every task end

    cfg, raw = long_run_config(tmp_path, tasks, tmp_path / "killed")
    cfg_path = str(tmp_path / "killed.json")
    with open(cfg_path, "w") as f:
        json.dump(raw, f)
    kill_after_task(cfg_path, cfg.run_dir, kill_after, str(tmp_path / "killed"), timeout)
    assert not os.path.exists(os.path.join(cfg.run_dir, "results.json"))  # it really died mid-sequence
    timings, Timed.timings = Timed.timings, {}  # the reference run's own timings
    resumed = Timed(cfg, resume="auto")
    start_task = resumed.state.position[0]
    assert start_task > kill_after, resumed.state.position
    got = resumed.run()
    assert comparable(got) == comparable(ref)
    with open(os.path.join(cfg.run_dir, "results.json")) as f:
        assert comparable(json.load(f)) == comparable(ref)
    assert_same_logs(cfg.run_dir, ref_cfg.run_dir, tasks)
    return {"resumed_at_task": start_task, "ref_run": ref_cfg.run_dir, "timings": timings}


def test_twenty_tasks_killed_after_task_15_resume_identically(tmp_path):
    out = killed_and_resumed_equals_uninterrupted(tmp_path, tasks=20, kill_after=15, timeout=300)
    assert out["resumed_at_task"] >= 16


@pytest.mark.slow
def test_two_hundred_tasks_killed_after_task_150_resume_identically(tmp_path):
    out = killed_and_resumed_equals_uninterrupted(tmp_path, tasks=200, kill_after=150, timeout=3000)
    assert out["resumed_at_task"] >= 151
    # what grows with T (printed for docs/long_sequences.md; run with -s)
    report = sizes(out["ref_run"])
    (t0, s0, n0), *_, (tl, sl, nl) = out["timings"]["eval"]
    report["eval_ms_per_image"] = {f"T={t0 + 1}": 1e3 * s0 / n0, f"T={tl + 1}": 1e3 * sl / nl}
    report["eval_images"] = {f"T={t0 + 1}": n0, f"T={tl + 1}": nl}
    saves = out["timings"]["save"]
    report["checkpoint_save_s"] = {"first": saves[0], "last": saves[-1]}
    print("\nlong run, 200 tasks:", json.dumps(report, indent=1))
