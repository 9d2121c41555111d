"""Checkpoints in one process: atomic folders and discovery (half-written ones are skipped),
keep-last-K, exact resumption from any position, and the refusals of an incompatible resume.
(Resuming after a SIGKILL, on 1 and 2 processes, is in test_distributed.py.)"""
import json
import os
import re

import pytest
import torch

from conftest import tiny_config_dict
from sdlora_ds.checkpoint import MANIFEST, CheckpointError, Checkpoints, read_manifest, write_json, write_torch
from sdlora_ds.config import config_from_dict


class OneProcess:
    """The accelerator surface Checkpoints uses, for a single process."""
    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self):
        pass


def save(ck: Checkpoints, step: int, payload: int = 0) -> str:
    shared = {"model.pt": write_torch({"w": torch.full((64,), float(payload))}),
              "trainer.json": write_json({"s": step})}
    meta = {"order": [step, 0], "task_end": None}
    return ck.save(f"step-{step:08d}", meta, shared, write_torch({"rng": torch.arange(3)}))


def test_half_written_checkpoints_are_skipped_for_the_last_complete_one(tmp_path):
    ck = Checkpoints(str(tmp_path / "checkpoints"), keep=10, accelerator=OneProcess())
    for step in (2, 4, 6):
        save(ck, step, payload=step)
    good = os.path.join(ck.root, "step-00000006")
    assert sorted(read_manifest(good)["files"]) == ["model.pt", "rank00000.pt", "trainer.json"]
    # What a run killed at various moments (or a damaged disk) leaves behind, all NEWER than step 6:
    import shutil
    shutil.copytree(good, os.path.join(ck.root, ".tmp-step-00000008"))  # killed before the rename
    trunc = os.path.join(ck.root, "step-00000010")                      # a file cut short
    shutil.copytree(good, trunc)
    with open(os.path.join(trunc, "model.pt"), "r+b") as f:
        f.truncate(100)
    nomani = os.path.join(ck.root, "step-00000012")                     # no manifest
    shutil.copytree(good, nomani)
    os.remove(os.path.join(nomani, MANIFEST))
    flipped = os.path.join(ck.root, "step-00000014")                    # same size, other bytes
    shutil.copytree(good, flipped)
    with open(os.path.join(flipped, "model.pt"), "r+b") as f:
        f.seek(-5, 2)
        b = f.read(1)
        f.seek(-5, 2)
        f.write(bytes([b[0] ^ 0xFF]))
    for path in (trunc, nomani, flipped):  # renumber their manifests so they would win if trusted
        mp = os.path.join(path, MANIFEST)
        if os.path.exists(mp):
            man = json.load(open(mp))
            man["order"] = [int(os.path.basename(path)[5:]), 0]
            json.dump(man, open(mp, "w"))
    complete, skipped = ck.scan()
    assert [os.path.basename(p) for p, _ in complete] == ["step-00000014", "step-00000006", "step-00000004",
                                                           "step-00000002"]  # 14 passes the size check
    assert any(".tmp-step-00000008" in s for s in skipped)
    assert any("step-00000010" in s and "half-written" in s for s in skipped)
    assert any("step-00000012" in s and MANIFEST in s for s in skipped)
    path, notes = ck.resolve("auto")
    assert path == good, notes
    assert any("step-00000014" in n and "sha256" in n for n in notes)
    assert torch.load(os.path.join(path, "model.pt"))["w"][0] == 6
    with pytest.raises(CheckpointError, match="temporary"):  # never picked up, even when named
        ck.resolve(os.path.join(ck.root, ".tmp-step-00000008"))
    with pytest.raises(CheckpointError, match="half-written"):
        ck.resolve(trunc)
    with pytest.raises(CheckpointError, match="never completed"):
        ck.resolve(nomani)
    assert ck.resolve(ck.root)[0] == good  # a checkpoints folder: its newest complete one
    with pytest.raises(CheckpointError, match="already holds checkpoints"):  # a fresh run would mix with them
        ck.resolve(None)
    ck.sweep()
    assert not any(n.startswith(".") for n in os.listdir(ck.root))


def test_keep_last_k_never_deletes_the_newest_task_end_checkpoint(tmp_path):
    """The newest task-end checkpoint is the only one that resumes on another world size or ZeRO
    stage: however many mid-task checkpoints follow it, it stays (older task ends do not)."""
    ck = Checkpoints(str(tmp_path / "ck"), keep=2, accelerator=OneProcess())

    def save_end(step, task):
        ck.save(f"step-{step:08d}-task{task}-end", {"order": [step, 1], "task_end": task},
                {"trainer.json": write_json({"s": step})}, write_torch({"rng": torch.arange(3)}))
    save_end(3, 0)
    for step in (4, 5, 6):
        save(ck, step)
    assert sorted(os.listdir(ck.root)) == ["step-00000003-task0-end", "step-00000005", "step-00000006"]
    save_end(7, 1)
    save(ck, 8)
    save(ck, 9)
    assert sorted(os.listdir(ck.root)) == ["step-00000007-task1-end", "step-00000008", "step-00000009"]


def test_keep_last_k_and_resaving_a_step(tmp_path):
    ck = Checkpoints(str(tmp_path / "ck"), keep=2, accelerator=OneProcess())
    for step in (1, 2, 3, 4):
        save(ck, step)
    assert sorted(os.listdir(ck.root)) == ["step-00000003", "step-00000004"]
    save(ck, 4, payload=7)  # a resumed run reaching the same step replaces it
    assert sorted(os.listdir(ck.root)) == ["step-00000003", "step-00000004"]
    assert torch.load(os.path.join(ck.root, "step-00000004", "model.pt"))["w"][0] == 7


# ---------------------------------------------------------------------- the trainer, in process
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from shards.digits import write_digits_shards
    return write_digits_shards(str(tmp_path_factory.mktemp("digits") / "shards"))


def small(shards, out, **over):
    """2 tasks x 2 epochs x 3 steps of a tiny random ViT, a checkpoint after every step."""
    raw = tiny_config_dict(index=shards, name="run", output_dir=str(out),
                           cil={"num_classes": 10, "init_classes": 5, "increment": 5, "num_tasks": 2},
                           data={"train_scale": [1.0, 1.0], "train_ratio": [1.0, 1.0]},
                           optim={"epochs": 2, "global_batch": 16, "micro_batch": 8, "max_steps_per_epoch": 3},
                           train={"checkpoint_every": 1, "keep_checkpoints": 100})
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return config_from_dict(raw)


def comparable(res: dict) -> dict:
    """results.json without what legitimately differs between two runs: wall-clock times, where it
    ran, the launch segments (a resumed run has one more: checked by test_topologies_...)."""
    res = json.loads(json.dumps(res))
    res.pop("task_seconds")
    res.pop("topologies")
    res["config"].pop("output_dir")
    return res


@pytest.fixture(scope="module")
def full_run(shards, tmp_path_factory):
    from sdlora_ds.trainer import Trainer
    out = tmp_path_factory.mktemp("full")
    res = Trainer(small(shards, out)).run()
    return out, res


def test_resume_from_any_position_is_bitwise_exact(shards, full_run, tmp_path):
    """Mid-epoch, at an epoch boundary, at a task end, in the second task (after grad accumulation 2)."""
    from sdlora_ds.trainer import Trainer
    out, ref = full_run
    root = os.path.join(out, "run", "checkpoints")
    names = sorted(os.listdir(root))
    assert "step-00000006-task0-end" in names and "step-00000012-task1-end" in names
    for name, position in [("step-00000002", (0, 0, 2)), ("step-00000003", (0, 0, 3)),
                           ("step-00000006-task0-end", (1, 0, 0)), ("step-00000010", (1, 1, 1))]:
        trainer = Trainer(small(shards, tmp_path / name), resume=os.path.join(root, name))
        assert trainer.state.position == position, name
        got = trainer.run()
        assert comparable(got) == comparable(ref), name
        with open(os.path.join(tmp_path, name, "run", "results.json")) as f:
            assert comparable(json.load(f)) == comparable(ref)


def test_checkpoints_keep_the_files_and_keys_earlier_versions_wrote(full_run):
    """The files, trainer.json's keys (in order) and the torch files' keys of the checkpoints every
    version since resume_config.json wrote (the parts registry changed none of them): a change here
    must keep older checkpoints readable (checkpoint_parts.py: old_files, before)."""
    out, _ = full_run
    root = os.path.join(out, "run", "checkpoints")
    shared = ["manifest.json", "model.pt", "rank00000.pt", "resume_config.json", "trainer.json"]
    assert sorted(os.listdir(os.path.join(root, "step-00000010"))) == sorted(shared + ["optimizer.pt"])
    end = os.path.join(root, "step-00000006-task0-end")
    assert sorted(os.listdir(end)) == shared
    with open(os.path.join(end, "trainer.json")) as f:
        assert list(json.load(f)) == ["position", "global_step", "acc_matrix", "acc_all", "loss_log", "task_times",
                                      "task_elapsed", "topologies", "magnitude_log", "events", "class_order",
                                      "global_batch", "log_position", "boundaries"]
    assert list(read_manifest(end)) == ["format", "name", "order", "global_step", "position", "task_end",
                                        "world_size", "zero_stage", "optimizer_state", "threads", "created", "files"]
    assert list(torch.load(os.path.join(end, "model.pt"), weights_only=True)) == ["structure", "state",
                                                                                   "backbone_fingerprint"]
    assert list(torch.load(os.path.join(end, "rank00000.pt"), weights_only=True)) == ["torch", "cuda", "numpy",
                                                                                       "python"]


def test_a_checkpoint_written_before_resume_config_json_still_resumes(shards, full_run, tmp_path):
    """Checkpoints once held the config as config.json (now resume_config.json, distinct from the run
    folder's config.json): such a checkpoint still resumes bitwise, and a config mismatch names it."""
    import shutil
    from sdlora_ds.resume import RESUME_CONFIG
    from sdlora_ds.trainer import Trainer
    out, ref = full_run
    old = str(tmp_path / "old" / "step-00000003")
    shutil.copytree(os.path.join(out, "run", "checkpoints", "step-00000003"), old)
    os.rename(os.path.join(old, RESUME_CONFIG), os.path.join(old, "config.json"))
    with open(os.path.join(old, "manifest.json")) as f:
        man = json.load(f)
    man["files"]["config.json"] = man["files"].pop(RESUME_CONFIG)
    with open(os.path.join(old, "manifest.json"), "w") as f:
        json.dump(man, f)
    with pytest.raises(CheckpointError, match=r"step-00000003/config\.json\) or start a new run"):
        Trainer(small(shards, tmp_path / "bad", optim={"lr": 0.01}), resume=old)
    got = Trainer(small(shards, tmp_path / "r"), resume=old).run()
    assert comparable(got) == comparable(ref)


def test_resume_refusals_name_the_field_and_the_fix(shards, full_run, tmp_path, capsys):
    import train  # launch/train.py (on sys.path: see _launch_on_path)
    from sdlora_ds.trainer import Trainer
    out, ref = full_run
    with pytest.raises(CheckpointError, match="--resume auto"):  # a fresh run into a folder with checkpoints
        Trainer(small(shards, out))
    with pytest.raises(CheckpointError, match=r"'optim\.lr': checkpoint 0\.05, this run 0\.01"):
        Trainer(small(shards, out, optim={"lr": 0.01}), resume="auto")
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        Trainer(small(shards, out), resume=str(tmp_path / "nowhere"))
    # the entry point turns them into one line and exit status 2, before any work
    from sdlora_ds.config import config_to_dict
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config_to_dict(small(shards, out))))
    assert train.main(["--config", str(path), "--set", "optim.lr=0.01", "--resume", "auto"]) == 2
    # fields that change nothing computed may differ: the finished run just writes its results again
    trainer = Trainer(small(shards, out, train={"log_every": 3, "keep_checkpoints": 100}), resume="auto")
    assert trainer.state.position == (2, 0, 0)
    capsys.readouterr()
    res = trainer.run()
    said = capsys.readouterr().out
    assert "finished run (all 2 tasks, global step 12): its results again, from " in said, said
    assert "resumed from" not in said and "threads:" not in said, said
    assert res["topologies"] == ref["topologies"]  # a re-run that trains nothing adds no launch segment
    got, want = comparable(res), comparable(ref)
    assert got.pop("config")["train"]["log_every"] == 3
    want.pop("config")
    assert got == want


@pytest.fixture(autouse=True, scope="module")
def _launch_on_path():
    import sys
    from conftest import ROOT
    sys.path.insert(0, os.path.join(ROOT, "launch"))


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_start_batch_skips_to_the_same_batches(shards, workers):
    """Resuming mid-epoch rebuilds the epoch's loader from batch k: exactly the batches k, k+1, ...
    of the uninterrupted epoch, whatever the worker count (the skipped ones are not decoded)."""
    from sdlora_ds.data import ShardIndex, build_loader
    cfg = small(shards, "unused")
    index = ShardIndex.load(shards)

    def batches(start):
        loader = build_loader(index, cfg.data, split="train", class_ids=[0, 3, 5, 7, 9], train=True, batch_size=8,
                              rank=1, world_size=2, seed=7, epoch=3, num_workers=workers, start_batch=start)
        return len(loader), [(x.sum().item(), y.tolist()) for x, y in loader]
    n, full = batches(0)
    m, tail = batches(5)
    assert m == n - 5 and tail == full[5:]
    assert batches(n) == (0, [])


# ---------------------------------------------------------------------- logs across resumes
class Killed(Exception):
    """Stands for a SIGKILL at a chosen point (the logs written so far are flushed: the worst case)."""


def killed_at(where: str):
    """A Trainer that dies at `where`: 'step<N>' after optimizer step N (its logs written), 'eval<t>'
    after task t's evaluation was logged (before its task-end checkpoint), 'finish' after the final
    metrics and hparams were logged (before results.json)."""
    from sdlora_ds.trainer import Trainer

    class Dying(Trainer):
        def train_step(self, t, micro_batches):
            loss = super().train_step(t, micro_batches)
            if where == f"step{self.state.global_step}":
                self.log.flush()
                raise Killed(where)
            return loss

        def evaluate(self, t):
            super().evaluate(t)
            if where == f"eval{t}":
                self.log.flush()
                raise Killed(where)

        def finish(self):
            if where == "finish":
                self.log.scalar("final/avg_acc", 0.0, len(self.state.acc_all) - 1)
                self.log.hparams({"x": 1}, {"avg_acc": 0.0}, len(self.state.acc_all) - 1)
                self.log.flush()
                raise Killed(where)
            return super().finish()
    return Dying


def logs(run_dir) -> tuple:
    """(everything TensorBoard's EventAccumulator reads back, metrics.jsonl lines)."""
    from sdlora_ds.logger import read_back
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return read_back(os.path.join(run_dir, "tensorboard")), f.read().splitlines()


def assert_same_logs(got_dir, ref_dir, tasks: int = 2):
    (tb, jsonl), (ref_tb, ref_jsonl) = logs(got_dir), logs(ref_dir)
    assert jsonl == ref_jsonl
    assert tb["tags"] == ref_tb["tags"]  # every point in order, hparams summaries included
    for kind in ("scalars", "images", "tensors"):
        assert tb[kind] == ref_tb[kind], kind
    assert [s for s, *_ in tb["images"]["eval/acc_matrix"]] == list(range(tasks))


@pytest.mark.parametrize("where,every", [("step7", 4), ("eval1", 4), ("finish", 1)])
def test_killed_and_resumed_logs_equal_an_uninterrupted_run(shards, full_run, tmp_path, where, every):
    """TensorBoard (read back with EventAccumulator) and metrics.jsonl of a run killed after step 7
    (resumed from step 4: steps 5-7 logged again), after its last evaluation (resumed mid-task: the
    task is evaluated again) or in finish (the final metrics and hparams again), and of a finished
    run re-run, equal the uninterrupted run's point for point."""
    from sdlora_ds.trainer import Trainer
    out, ref = full_run
    cfg = small(shards, tmp_path, train={"checkpoint_every": every, "keep_checkpoints": 100})
    with pytest.raises(Killed):
        killed_at(where)(cfg).run()
    Trainer(cfg, resume="auto").run()
    assert_same_logs(os.path.join(tmp_path, "run"), os.path.join(out, "run"))
    if where == "finish":  # and a finished run run again changes nothing either
        Trainer(cfg, resume="auto").run()
        assert_same_logs(os.path.join(tmp_path, "run"), os.path.join(out, "run"))


def test_a_fresh_start_over_old_logs_starts_them_fresh(shards, full_run, tmp_path, capsys):
    """Killed before its first checkpoint: a fresh start (no --resume, or --resume auto finding
    none) removes the earlier attempt's logs instead of appending to them."""
    from sdlora_ds.trainer import Trainer
    out, _ = full_run
    cfg = small(shards, tmp_path, train={"checkpoint_every": 0})
    with pytest.raises(Killed):
        killed_at("step4")(cfg).run()
    assert not os.path.exists(os.path.join(tmp_path, "run", "checkpoints"))
    assert os.path.getsize(os.path.join(tmp_path, "run", "metrics.jsonl")) > 0
    Trainer(cfg).run()
    assert_same_logs(os.path.join(tmp_path, "run"), os.path.join(out, "run"))
    assert "fresh start: removed" in capsys.readouterr().out
    # the logs of a whole run and a killed one, no checkpoint: --resume auto starts them fresh too
    import shutil
    shutil.rmtree(os.path.join(tmp_path, "run", "checkpoints"))
    with pytest.raises(Killed):
        killed_at("step3")(cfg).run()
    Trainer(cfg, resume="auto").run()
    assert_same_logs(os.path.join(tmp_path, "run"), os.path.join(out, "run"))


def _damage(path: str) -> None:
    with open(os.path.join(path, "model.pt"), "r+b") as f:
        f.seek(-5, 2)
        b = f.read(1)
        f.seek(-5, 2)
        f.write(bytes([b[0] ^ 0xFF]))


def test_resume_auto_with_every_checkpoint_damaged_stops_unless_asked(shards, full_run, tmp_path, capsys,
                                                                     monkeypatch):
    import shutil
    import train
    from sdlora_ds.config import config_to_dict
    from sdlora_ds.trainer import Trainer
    out, _ = full_run
    cfg = small(shards, tmp_path, train={"checkpoint_every": 0, "keep_checkpoints": 100})
    with pytest.raises(Killed):
        killed_at("step9")(cfg).run()
    root = os.path.join(tmp_path, "run", "checkpoints")
    assert os.listdir(root) == ["step-00000006-task0-end"]
    _damage(os.path.join(root, "step-00000006-task0-end"))
    with pytest.raises(CheckpointError, match=r"every checkpoint .* is damaged.*sha256.*--fresh-if-damaged"):
        Trainer(cfg, resume="auto")
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config_to_dict(cfg)))
    capsys.readouterr()
    # train.main sets the thread count from the machine; the run below compares with full_run's
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    assert train.main(["--config", str(path), "--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "damaged" in err and "\n" not in err, err
    with pytest.raises(ValueError, match="--resume auto"):  # the flag is for --resume auto only
        Trainer(cfg, fresh_if_damaged=True)
    Trainer(cfg, resume="auto", fresh_if_damaged=True).run()
    assert ".damaged-step-00000006-task0-end" in os.listdir(root)  # set aside for inspection, never picked up
    assert_same_logs(os.path.join(tmp_path, "run"), os.path.join(out, "run"))
    shutil.rmtree(os.path.join(root, ".damaged-step-00000006-task0-end"))


def truncate_task_shards(index_path: str, classes, split: str = "train") -> dict:
    """Cut every shard of `split` holding only `classes` after its first tar member (as a full disk
    or a broken copy leaves it): any read of one fails at once, naming the shard and its first key.
    Returns {path: original bytes} to put them back."""
    with open(index_path) as f:
        idx = json.load(f)
    originals = {}
    for sh in idx["splits"][split]["shards"]:
        if set(sh["classes"]) <= set(classes):
            path = os.path.join(os.path.dirname(index_path), sh["path"])
            with open(path, "rb") as f:
                originals[path] = f.read()
            with open(path, "r+b") as f:
                f.truncate(3 * 512)  # header, one small member, the next header
    assert originals
    return originals


def put_back(originals: dict) -> None:
    for path, data in originals.items():
        with open(path, "wb") as f:
            f.write(data)


def test_bad_data_during_training_is_one_line_and_the_run_resumes_once_fixed(shards, full_run, tmp_path, capsys,
                                                                             monkeypatch):
    """A shard of task 1 goes bad after the run started (checksums not verified at the start):
    the run stops in task 1 with one `error:` line naming the shard and key and exit status 2, the
    task-0 checkpoint is intact, and once the shard is put back --resume auto ends exactly as the
    uninterrupted run."""
    import shutil
    import train
    from sdlora_ds.cil import TaskSchedule
    from sdlora_ds.config import config_to_dict
    out, ref = full_run
    copy = str(tmp_path / "shards")
    shutil.copytree(os.path.dirname(shards), copy)
    index = os.path.join(copy, os.path.basename(shards))
    cfg = small(index, tmp_path / "runs", data={"verify_checksums": False}, train={"checkpoint_every": 0})
    originals = truncate_task_shards(index, TaskSchedule.from_config(cfg.cil).classes(1))
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config_to_dict(cfg)))
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # full_run's count
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    capsys.readouterr()
    assert train.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    lines = [line.strip() for line in err.splitlines() if "error" in line]  # stderr also holds the progress bars
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert "bad sample(s) 1:" not in err, err  # no warning line repeating the error
    assert re.search(r"shard (\S+) key (\S+): tar unreadable after this key", lines[0]), lines[0]
    assert re.search(r"shard (\S+) key", lines[0]).group(1) in originals and "--resume auto" in lines[0], lines[0]
    ck = Checkpoints(os.path.join(cfg.run_dir, "checkpoints"), 100, OneProcess())
    resumed, notes = ck.resolve("auto")
    assert os.path.basename(resumed) == "step-00000006-task0-end" and not notes, notes  # intact
    put_back(originals)
    assert train.main(["--config", str(path), "--resume", "auto", "--set", "data.verify_checksums=true"]) == 0
    with open(os.path.join(cfg.run_dir, "results.json")) as f:
        got = json.load(f)
    assert comparable(got)["loss_log"] == comparable(ref)["loss_log"] and got["acc_matrix"] == ref["acc_matrix"]
    assert_same_logs(cfg.run_dir, os.path.join(out, "run"))


def test_results_record_every_launch_topology_and_the_backbone_used(shards, full_run, tmp_path):
    """A run resumed twice lists three launch segments; the backbone recorded is the loaded one."""
    from sdlora_ds.trainer import Trainer
    out, ref = full_run
    cfg = small(shards, tmp_path, train={"checkpoint_every": 4, "keep_checkpoints": 100})
    with pytest.raises(Killed):
        killed_at("step5")(cfg).run()
    with pytest.raises(Killed):
        killed_at("step10")(cfg, resume="auto").run()
    res = Trainer(cfg, resume="auto").run()
    assert [t["from_global_step"] for t in res["topologies"]] == [0, 4, 8]
    assert [t["from_position"] for t in res["topologies"]] == [[0, 0, 0], [0, 1, 1], [1, 0, 2]]
    assert all((t["world_size"], t["micro_batch"], t["grad_accum"], t["zero_stage"]) == (1, 8, 2, None)
               for t in res["topologies"])
    assert len(ref["topologies"]) == 1


def test_resume_continues_with_the_recorded_thread_count(shards, full_run, tmp_path, capsys, monkeypatch):
    """The thread count is recorded in results.json and every checkpoint; a resume launched with
    another automatic count goes back to the recorded one (and ends bitwise equal), a forced one is
    kept with a warning."""
    from sdlora_ds.trainer import Trainer
    out, ref = full_run
    recorded = torch.get_num_threads()  # the session's count: full_run was built under it (conftest)
    assert [t["threads"] for t in ref["topologies"]] == [recorded]
    ckpt = os.path.join(out, "run", "checkpoints", "step-00000004")
    assert read_manifest(ckpt)["threads"] == recorded
    other = 1 if recorded != 1 else 2
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SDLORA_THREADS_SOURCE", raising=False)
    torch.set_num_threads(other)  # what another machine, load or launch would have chosen
    capsys.readouterr()
    trainer = Trainer(small(shards, tmp_path / "auto"), resume=ckpt)
    assert torch.get_num_threads() == recorded
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("threads:")]
    assert said == [f"threads: {recorded} per process, as recorded in the checkpoint (this launch would have used "
                    f"{other}), so the run continues bitwise"], said
    got = trainer.run()
    printed = capsys.readouterr()
    # tasks count from 0, epochs from 1 of 2, alike in the resume line, the step lines and the progress bar
    assert f"resumed from {ckpt}: task 0, epoch 2/2, after 1 of its steps (global step 4)" in printed.out
    assert "step 10 | task 1 epoch 2/2 | loss" in printed.out and "task 1 epoch 2/2" in printed.err, printed
    assert comparable(got) == comparable(ref)
    assert [t["threads"] for t in got["topologies"]] == [recorded, recorded]
    monkeypatch.setenv("OMP_NUM_THREADS", str(other))  # forced: kept, with the warning
    torch.set_num_threads(other)
    capsys.readouterr()
    got = Trainer(small(shards, tmp_path / "forced"), resume=ckpt).run()
    assert torch.get_num_threads() == other
    assert "will not be bitwise" in capsys.readouterr().out
    assert [t["threads"] for t in got["topologies"]] == [recorded, other]


def test_activation_checkpointing_resumes_a_plain_run_to_the_same_numbers(shards, full_run, tmp_path):
    """Turned on when resuming a run that trained without it (what a run that ran out of memory
    does): the rest of the run is bitwise the uninterrupted plain run (same kernels, recomputed)."""
    from sdlora_ds.trainer import Trainer
    out, ref = full_run
    ck = os.path.join(out, "run", "checkpoints", "step-00000010")
    got = Trainer(small(shards, tmp_path, train={"activation_checkpointing": True}), resume=ck).run()
    assert got["config"]["train"]["activation_checkpointing"] is True
    got["config"]["train"]["activation_checkpointing"] = False
    assert comparable(got) == comparable(ref)


def test_task_ends_at_one_global_step_resume_from_the_last_task(tmp_path):
    """A method without optimizer steps (NCM) ends every task at global step 0: the newest checkpoint
    is the last task's end, and keep-last-K keeps the last ones (it once picked task 0's end, so a
    finished NCM run redid tasks 1-3 on `--resume auto`)."""
    from sdlora_ds.checkpoint import checkpoint_order
    ck = Checkpoints(str(tmp_path / "ck"), keep=2, accelerator=OneProcess())
    for task in range(4):
        ck.save(f"step-00000000-task{task}-end", {"order": checkpoint_order(0, task), "task_end": task},
                {"trainer.json": write_json({"t": task})}, write_torch({"rng": torch.arange(3)}))
    assert sorted(os.listdir(ck.root)) == ["step-00000000-task2-end", "step-00000000-task3-end"]
    assert os.path.basename(ck.newest()[0]) == "step-00000000-task3-end"
    assert checkpoint_order(5, None) < checkpoint_order(5, 0) < checkpoint_order(6, None)
