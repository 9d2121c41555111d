"""`launch/train.py --dry-run` on the user's exact path: configs/imagenetr_b40.json as shipped (its
relative backbone.path and data.index resolved from a scratch working directory), ViT-B/16-shaped
weights in timm's layout at the path the config names (random values, written here), ImageNet-R-like
JPEG shards at 224 px built by the real converter (shards.imagenet_r, 200 WordNet-id folders), under
DeepSpeed ZeRO-2 on two CPU processes (accelerate launch, gloo).

Two runs of it: `test_dry_run_exact` takes the config as it is (global batch 128: 2 steps x 128 images
x 5 tasks through ViT-B/16 at 224 px on the CPU; slow); the default one adds
`--set optim.global_batch=4` and a 4-image evaluation sample, which keeps the rest (weights, shards,
launcher, ZeRO-2, checkpoints, the run folder) and fits CI. Measured times are in the issue note."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT
from sdlora_ds.config import load_config
from sdlora_ds.run_record import config_record

CONFIG = os.path.join(ROOT, "configs", "imagenetr_b40.json")
TRAIN_PER_CLASS, TEST_PER_CLASS = 7, 1  # 280 training images per 40-class task: 2 full global batches of 128


def timm_vit_b16(path: str) -> None:
    """Random ViT-B/16 weights (224 px, 1000-class head) in timm's key layout, as a .safetensors file."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    d, mlp, layers = 768, 3072, 12

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).contiguous()

    sd = {"cls_token": rnd(1, 1, d), "pos_embed": rnd(1, 197, d), "patch_embed.proj.weight": rnd(d, 3, 16, 16),
          "patch_embed.proj.bias": torch.zeros(d), "norm.weight": torch.ones(d), "norm.bias": torch.zeros(d),
          "head.weight": rnd(1000, d), "head.bias": torch.zeros(1000)}
    for i in range(layers):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": torch.ones(d), b + "norm1.bias": torch.zeros(d),
                   b + "attn.qkv.weight": rnd(3 * d, d), b + "attn.qkv.bias": torch.zeros(3 * d),
                   b + "attn.proj.weight": rnd(d, d), b + "attn.proj.bias": torch.zeros(d),
                   b + "norm2.weight": torch.ones(d), b + "norm2.bias": torch.zeros(d),
                   b + "mlp.fc1.weight": rnd(mlp, d), b + "mlp.fc1.bias": torch.zeros(mlp),
                   b + "mlp.fc2.weight": rnd(d, mlp), b + "mlp.fc2.bias": torch.zeros(d)})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(sd, path)


def imagenet_r_like(src: str, classes: int = 200) -> None:
    """Pre-split ImageNet-R layout (train/<wnid>/, test/<wnid>/): 224-px JPEGs, a smooth random field
    with a per-class tint and some noise, shorter side 224, aspect 1-1.4, every third portrait."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(classes):
        wnid = f"n{1440000 + 37 * c:08d}"
        tint = rng.integers(0, 256, 3)
        for split, n in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
            folder = os.path.join(src, split, wnid)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                long = int(224 * rng.uniform(1.0, 1.4))
                w, h = (224, long) if i % 3 == 0 else (long, 224)
                field = rng.integers(0, 256, (h // 16, w // 16, 3)).astype(np.uint8)
                arr = np.asarray(Image.fromarray(field).resize((w, h), Image.BICUBIC)).astype(np.int16) // 2 + tint // 2
                arr = arr + rng.integers(-8, 9, (h, w, 3))
                Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{wnid}_{i}.jpg"),
                                                                            quality=90)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch working directory holding what configs/imagenetr_b40.json names, at its relative paths."""
    from shards.imagenet_r import convert_imagenet_r
    cfg = load_config(CONFIG)
    root = tmp_path_factory.mktemp("dry_run")
    timm_vit_b16(str(root / cfg.backbone.path))
    imagenet_r_like(str(root / "raw"))
    index = convert_imagenet_r(str(root / "raw"), str(root / os.path.dirname(cfg.data.index)), workers=2,
                               progress=False)
    assert os.path.samefile(index, root / cfg.data.index)
    return root


def dry_run(workdir, *extra) -> tuple:
    from test_distributed import free_port
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "launch", "accelerate_cpu_zero2.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()), os.path.join(ROOT, "launch", "train.py"),
           "--config", CONFIG, "--dry-run", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    print(f"dry run {' '.join(extra) or '(config as shipped)'}: {seconds:.0f} s")
    return proc, seconds


def check(workdir, proc, global_batch: int, eval_images: int) -> dict:
    cfg = load_config(CONFIG)
    run_dir = workdir / "runs" / "imagenetr_b40-dry-run"
    assert not (workdir / "runs" / "imagenetr_b40").exists()  # the real run's folder is never touched
    assert f"dry run: run folder runs/imagenetr_b40-dry-run (the real run's: runs/imagenetr_b40); per task 2 " \
           f"optimizer step(s) of global batch {global_batch}" in proc.stdout
    assert "DeepSpeed ZeRO-2" in proc.stdout
    samples = [ln for ln in proc.stdout.splitlines() if ln.startswith("evaluation sample")]
    assert len(samples) == 5, proc.stdout[-3000:]  # printed after every task
    with open(run_dir / "results.json") as f:
        res = json.load(f)
    assert res["world_size"] == 2 and res["zero_stage"] == 2
    assert [s for s, _ in res["loss_log"]] == list(range(1, 11))  # 2 optimizer steps x 5 tasks
    assert [len(r) for r in res["acc_matrix"]] == [1, 2, 3, 4, 5]
    assert res["backbone"]["num_parameters"] == 85_798_656 and res["backbone"]["hidden_size"] == 768
    # the user's config, except what the dry run changes (the backbone's architecture fields hold the
    # loaded model's values in every run's record: config_record)
    want, got = config_record(cfg, res["backbone"]), res["config"]
    diff = {f"{s}.{k}" for s in want if isinstance(want[s], dict) for k in want[s] if want[s][k] != got[s][k]}
    diff |= {k for k in want if not isinstance(want[k], dict) and want[k] != got[k]}
    expected = {"name", "optim.epochs", "optim.max_steps_per_epoch", "train.eval_batch", "train.eval_max_batches"}
    if global_batch != cfg.optim.global_batch:
        expected.add("optim.global_batch")
    assert diff == expected, diff
    assert got["train"]["eval_batch"] * 2 == eval_images and got["train"]["eval_max_batches"] == 1
    ckpts = sorted(os.listdir(run_dir / "checkpoints"))
    assert ckpts[-1].endswith("-task4-end") and os.path.isfile(run_dir / "final_model.pt")
    return res


@pytest.mark.slow
def test_dry_run_imagenetr_b40_small_batch(workdir):
    proc, _ = dry_run(workdir, "--set", "optim.global_batch=4", "--dry-run-eval-images", "4")
    check(workdir, proc, 4, 4)
    # a second dry run is refused like any run folder holding checkpoints (one line, the fix named)
    again = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", CONFIG,
                            "--dry-run", "--set", "optim.global_batch=4"], cwd=workdir, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 2 and "imagenetr_b40-dry-run" in again.stderr + again.stdout


@pytest.mark.slow
def test_dry_run_exact(workdir, tmp_path):
    import shutil
    shutil.rmtree(workdir / "runs", ignore_errors=True)
    proc, _ = dry_run(workdir)
    check(workdir, proc, 128, 64)


def test_dry_run_tiny_config(tmp_path):
    """The default-CI check of the same path at test size: digits shards, the tiny test ViT, one process."""
    from conftest import tiny_config_dict
    from shards.digits import write_digits_shards
    index = write_digits_shards(str(tmp_path / "shards"))
    raw = tiny_config_dict(index=index, name="tiny", output_dir=str(tmp_path / "runs"),
                           optim={"epochs": 3, "global_batch": 16}, train={"eval_batch": 64})
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(json.dumps(raw))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", str(cfg_path),
                           "--dry-run", "--dry-run-steps", "1", "--dry-run-eval-images", "8"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny-dry-run"
    assert proc.stdout.splitlines()[0] == (
        f"dry run: run folder {run_dir} (the real run's: {tmp_path / 'runs' / 'tiny'}); per task 1 optimizer step(s) "
        "of global batch 16 (micro-batch 16 x accumulation 1 x 1 process(es)) instead of 3 epoch(s); evaluation on "
        "a sample of at most 8 test images after each task (eval batch 8 per rank, 1 batch); everything else as "
        "configured")
    samples = [ln for ln in proc.stdout.splitlines() if ln.startswith("evaluation sample")]
    assert len(samples) == 5 and all(": 8 of " in ln for ln in samples), samples
    res = json.loads((run_dir / "results.json").read_text())
    assert [s for s, _ in res["loss_log"]] == [1, 2, 3, 4, 5]
    assert not (tmp_path / "runs" / "tiny").exists()


def test_dry_run_config_changes_only_what_it_says():
    from conftest import tiny_config_dict
    from sdlora_ds.config import ConfigError, config_from_dict, config_to_dict
    from sdlora_ds.dryrun import dry_run_config
    cfg = config_from_dict(tiny_config_dict(train={"eval_batch": 4}, optim={"lr": 0.05, "epochs": 5, "global_batch": 16}))
    dry = dry_run_config(cfg, world_size=2, steps=3, eval_images=64)
    assert (dry.name, dry.optim.epochs, dry.optim.max_steps_per_epoch) == ("test-dry-run", 1, 3)
    assert (dry.train.eval_batch, dry.train.eval_max_batches) == (4, 1)  # never raised above the user's
    assert dry_run_config(cfg, world_size=2, eval_images=5).train.eval_batch == 3  # ceil(5 / 2)
    a, b = config_to_dict(cfg), config_to_dict(dry)
    assert {f"{s}.{k}" for s in a if isinstance(a[s], dict) for k in a[s] if a[s][k] != b[s][k]} | \
        {k for k in a if not isinstance(a[k], dict) and a[k] != b[k]} == \
        {"name", "optim.epochs", "optim.max_steps_per_epoch", "train.eval_max_batches"}
    assert config_to_dict(cfg) == a  # the user's config object is untouched
    with pytest.raises(ConfigError, match="--dry-run-steps"):
        dry_run_config(cfg, 1, steps=0)
