"""sdlora_ds/cli/sweep.py (sdlora-sweep): command construction, skipping finished runs, resuming, failures (no real training:
the launcher is a fake train.py that resolves the config like train.py and writes a results.json)."""
import json
import os
import shlex
import sys
import textwrap

import pytest

from conftest import ROOT

from sdlora_ds.cli import sweep

CONFIGS = [os.path.join(ROOT, "configs", f"{name}.json") for name in ("demo_digits", "demo_digits_seq_lora")]

FAKE = textwrap.dedent('''
    """Stands in for `accelerate launch ... launch/train.py`.
    argv: [train.py, --config, C, --set ..., --resume auto]."""
    import json, os, sys
    sys.path.insert(0, {root!r})
    from sdlora_ds import metrics
    from sdlora_ds.config import config_to_dict, load_config
    args = sys.argv[1:]
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    cfg = load_config(args[args.index("--config") + 1], sets)
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(json.dumps(args) + "\\n")
    print("fake training", cfg.name)
    if cfg.name in os.environ.get("FAKE_FAIL", "").split(","):
        print("boom: simulated crash")
        sys.exit(3)
    if cfg.name in os.environ.get("FAKE_SILENT", "").split(","):
        sys.exit(0)  # exits 0 without finishing: the sweep must not count it as done
    T, s = cfg.cil.num_tasks, cfg.seed % 10
    acc = [[90.0 - 10 * (t - j) - s for j in range(t + 1)] for t in range(T)]
    acc_all = [sum(r) / len(r) for r in acc]
    os.makedirs(cfg.run_dir, exist_ok=True)
    res = {{"method": cfg.method, "dataset": "digits", **metrics.summarize(acc, acc_all), "task_seconds": [0.1] * T,
           "config": config_to_dict(cfg)}}
    json.dump(res, open(os.path.join(cfg.run_dir, "results.json"), "w"))
''')


@pytest.fixture
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE.format(root=ROOT))
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.delenv("FAKE_FAIL", raising=False)

    def read_calls():
        return [json.loads(line) for line in open(calls)] if calls.exists() else []
    return f"{sys.executable} {shlex.quote(str(script))}", read_calls


def test_commands_vary_both_seeds_and_name_the_run_folders(tmp_path):
    out = str(tmp_path / "sw")
    jobs = sweep.plan(CONFIGS, [1993, 7], out, ["optim.epochs=1"])
    assert [j.name for j in jobs] == ["demo_digits__s1993", "demo_digits__s7", "demo_digits_seq_lora__s1993",
                                      "demo_digits_seq_lora__s7"]
    j = jobs[1]
    assert j.run_dir == os.path.join(out, "demo_digits__s7")
    assert j.config["seed"] == 7 and j.config["cil"]["order_seed"] == 7 and j.config["optim"]["epochs"] == 1
    assert j.config["name"] == "demo_digits__s7" and j.config["output_dir"] == out
    launcher = sweep.default_launcher("launch/accelerate_cpu.yaml", 2)
    assert launcher == [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                        "launch/accelerate_cpu.yaml", "--num_processes", "2"]
    cmd = sweep.command(j, launcher)
    assert cmd[:len(launcher)] == launcher and cmd[len(launcher)].endswith(os.path.join("launch", "train.py"))
    rest = cmd[len(launcher) + 1:]
    assert rest[:2] == ["--config", CONFIGS[0]] and rest[-2:] == ["--resume", "auto"]
    sets = [rest[i + 1] for i, a in enumerate(rest) if a == "--set"]
    assert sets == ["optim.epochs=1", "seed=7", "cil.order_seed=7", 'name="demo_digits__s7"',
                    f"output_dir={json.dumps(out)}"]


def test_plan_refuses_bad_input(tmp_path):
    out = str(tmp_path / "sw")
    with pytest.raises(ValueError, match="the sweep sets seed"):
        sweep.plan(CONFIGS, [1], out, ["seed=3"])
    with pytest.raises(ValueError, match="same name 'demo_digits'"):
        sweep.plan([CONFIGS[0], CONFIGS[0]], [1], out, [])
    with pytest.raises(ValueError, match="optim.lrr"):
        sweep.plan(CONFIGS, [1], out, ["optim.lrr=0.1"])  # a typo stops the sweep before any run
    with pytest.raises(ValueError, match="listed twice"):
        sweep.plan(CONFIGS, [1, 1], out, [])


def test_sweep_runs_records_skips_and_fails(fake, tmp_path, monkeypatch, capsys):
    launcher, calls = fake
    out = str(tmp_path / "sw")
    argv = ["--configs", *CONFIGS, "--seeds", "1993", "1994", "--out", out, "--launcher", launcher,
            "--set", "optim.epochs=1"]
    monkeypatch.setenv("FAKE_FAIL", "demo_digits__s1994")
    assert sweep.main(argv) == 1  # a failure does not stop the sweep, but fails it
    cap = capsys.readouterr()
    assert "failed runs:" in cap.err and "demo_digits__s1994 (exit code 3" in cap.err
    assert "[2/4] demo_digits__s1994: FAILED" in cap.out and "boom: simulated crash" in cap.out  # log tail
    assert "[4/4] demo_digits_seq_lora__s1994: ok in" in cap.out and "elapsed" in cap.out
    rec = json.load(open(os.path.join(out, "sweep.json")))
    assert [(r["name"], r["status"], r["returncode"]) for r in rec["runs"]] == [
        ("demo_digits__s1993", "ok", 0), ("demo_digits__s1994", "failed", 3),
        ("demo_digits_seq_lora__s1993", "ok", 0), ("demo_digits_seq_lora__s1994", "ok", 0)]
    assert all(r["wall_s"] >= 0 and r["command"][-2:] == ["--resume", "auto"] for r in rec["runs"])
    assert "boom" in open(rec["runs"][1]["log"]).read()
    assert len(calls()) == 4

    monkeypatch.delenv("FAKE_FAIL")
    assert sweep.main(argv) == 0  # re-run: the three finished runs are skipped, the failed one re-run
    assert [json.loads(a.split("=", 1)[1]) for c in calls()[4:] for a in c if a.startswith("name=")] == \
        ["demo_digits__s1994"]
    rec = json.load(open(os.path.join(out, "sweep.json")))
    assert [r["status"] for r in rec["runs"]] == ["skipped", "ok", "skipped", "skipped"]
    assert "finished earlier, skipped" in capsys.readouterr().out

    from sdlora_ds.report import write_report  # the sweep folder is what the report reads
    md = open(write_report([out], str(tmp_path / "rep"))["markdown"]).read()
    assert "| SD-LoRA | `demo_digits` | 2 | 1993, 1994 |" in md and "| seq. LoRA | `demo_digits_seq_lora` | 2 |" in md


def test_exit_zero_without_results_is_a_failure(fake, tmp_path, monkeypatch):
    launcher, _ = fake
    monkeypatch.setenv("FAKE_SILENT", "demo_digits__s5")
    out = str(tmp_path / "sw")
    assert sweep.main(["--configs", CONFIGS[0], "--seeds", "5", "--out", out, "--launcher", launcher]) == 1
    assert json.load(open(os.path.join(out, "sweep.json")))["runs"][0]["status"] == "failed"


def test_status_resume_and_foreign_results(tmp_path):
    out = str(tmp_path / "sw")
    job = sweep.plan([CONFIGS[0]], [3], out, [])[0]
    assert sweep.run_status(job) == "new"
    os.makedirs(os.path.join(job.run_dir, "checkpoints", "step-00000010"))
    assert sweep.run_status(job) == "resume"  # interrupted: train.py --resume auto continues it
    other = sweep.plan([CONFIGS[0]], [3], out, ["optim.lr=0.01"])[0].config
    with open(os.path.join(job.run_dir, "results.json"), "w") as f:
        json.dump({"config": other, "acc_matrix": [[1.0]] * 5}, f)
    with pytest.raises(ValueError, match=r"another config \(field 'optim.lr': 0.01, the sweep now gives 0.05\)"):
        sweep.run_status(job)
    moved = dict(job.config, output_dir="/cluster/scratch/sw")  # copied back from elsewhere: still done
    with open(os.path.join(job.run_dir, "results.json"), "w") as f:
        json.dump({"config": moved, "acc_matrix": [[1.0]] * 5}, f)
    assert sweep.run_status(job) == "done"


def test_dry_run_prints_and_runs_nothing(tmp_path, capsys):
    out = str(tmp_path / "sw")
    assert sweep.main(["--configs", *CONFIGS, "--seeds", "1", "--out", out, "--nproc", "2", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("[1/2] demo_digits__s1: new: ")
    assert "accelerate.commands.launch --config_file" in lines[0] and "--num_processes 2" in lines[0]
    assert not os.path.exists(out)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert sweep.main(["--configs", CONFIGS[0], "--out", str(tmp_path), "--accelerate-config", "nope.yaml"]) == 2
    assert sweep.main(["--configs", str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error: ") for e in err) and "missing.json" in err[1]


def test_works_from_any_folder(tmp_path, monkeypatch, capsys):
    """The checkout's launch/train.py and accelerate config are found from the package, not ./launch."""
    monkeypatch.chdir(tmp_path)
    assert sweep.main(["--configs", CONFIGS[0], "--seeds", "1", "--out", "sw", "--dry-run"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert os.path.join(ROOT, "launch", "train.py") in line
    assert os.path.join(ROOT, "launch", "accelerate_cpu.yaml") in line
