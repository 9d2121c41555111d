"""sdlora_ds/plan.py and `launch/train.py --plan`: runs for every shipped config without weights or
data, numbers checked by hand on a tiny config, activations against a measured CPU step."""
import glob
import json
import os
import sys

import pytest

from conftest import ROOT, tiny_config_dict
from sdlora_ds.config import config_from_dict
from sdlora_ds.plan import GIB, Setting, activation_bytes, architecture, format_plan, make_plan, what_fits

sys.path.insert(0, os.path.join(ROOT, "launch"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import train  # noqa: E402
from activation_memory import measured_step  # noqa: E402  (bench/: LivePeak, one measured CPU step)

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.json")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_plan_runs_for_every_shipped_config_without_weights_or_data(path, capsys):
    with open(path) as f:
        raw = json.load(f)
    name, optim = raw["name"], raw.get("optim", {})
    # 4 processes, or 2 for a config that pins a micro-batch 4 ranks cannot split (the demo: 8 = 4 x 2 ranks)
    nproc = 2 if optim.get("micro_batch") and optim["global_batch"] % (4 * optim["micro_batch"]) else 4
    assert train.main(["--config", path, "--plan", "--num_processes", str(nproc), "--gpu-mem", "24"]) == 0
    out = capsys.readouterr().out
    assert f"memory plan for {name!r} (the plan's arithmetic, not a measurement)" in out
    assert "total" in out and ("fits" in out or "DOES NOT FIT" in out)


def test_large_configs_declare_their_architecture():
    want = {"vitl16": ("vit", 24, 1024, 4096, False, 197, 303.3), "dinov2_l14": ("dinov2", 24, 1024, 4096, False, 257, 304.4),
            "dinov2_g14": ("dinov2", 40, 1536, 4096, True, 257, 1136.5)}
    for name, (arch, layers, d, f, swiglu, tokens, millions) in want.items():
        from sdlora_ds.config import load_config
        a = architecture(load_config(os.path.join(ROOT, "configs", f"imagenetr_b40_{name}.json")))
        assert (a.arch, a.layers, a.hidden, a.mlp_hidden, a.swiglu, a.tokens) == (arch, layers, d, f, swiglu, tokens)
        assert round(a.params / 1e6, 1) == millions and "declared" in a.source


def tiny(**over):
    return config_from_dict(tiny_config_dict(**over))


def test_hand_checked_numbers_on_a_tiny_config():
    # ViT d=32, 2 blocks, 4 heads, MLP 64, patch 8 at 32 px: N = 16 + 1 tokens; 5 tasks of rank 4, 10 classes;
    # global batch 16 on 2 processes: micro-batch 8; 'auto' precision = 16-bit (e = 2).
    cfg = tiny()
    p = make_plan(cfg, Setting(num_processes=2, gpu_mem_gib=1, zero_stage=3))
    assert (p.micro, p.accum, p.arch.tokens) == (8, 1, 17)
    # backbone: patch 32*3*64+32, cls 32, positions 17*32; per block 4 (32*32+32) + (32*64+64) + (64*32+32)
    # + 2 LayerNorms 4*32; final LayerNorm 64
    assert p.arch.params == 6176 + 32 + 544 + 2 * (4224 + 2112 + 2080 + 128) + 64 == 23904
    # every tensor is below ds_zero3.json's persistence threshold (1e5): all kept whole, 2 B each
    assert p.rows["frozen parameters"] == 2 * 23904
    # DeepSpeed's working set: 4 B x the largest layer (the patch projection, 6176), + 2 B x the 5e7 prefetch bucket
    assert p.rows["gathered layers + prefetch"] == 4 * 6176 + 2 * 50_000_000
    # 4 tasks' frozen directions: 4 projections x (A 4x32 + B 32x4) x 4 tasks, 2 B each
    assert p.rows["frozen directions"] == 2 * 4 * 256 * 4
    # trainable: current A/B 4 x 256, 5 magnitudes, head 33 x 10 = 1359; DeepSpeed's 18 B / param / 2 ranks
    assert (p.rows["adapters"], p.rows["gradients"], p.rows["optimizer states"]) == (1359, 4077, 6795)
    # per block: 2*8*17*(7*32 + 64 + 2*4) + 4*8*17*(4 + 4) + 2*2*32*32; backward working set 2*8*17*2*64
    assert p.activations["per_block"] == 80512 + 4352 + 4096
    assert p.activations["transient"] == 34816
    # the first block keeps no LayerNorm input / statistics and no merged weights: 2*8*17*32 + 4*8*17*2 + 2*2*32*32
    assert p.activations["kept"] == 2 * 88960 - (8704 + 1088 + 4096)
    assert p.rows["activations"] == p.activations["kept"] + 34816
    assert p.total == sum(p.rows.values()) and p.fits
    # ZeRO-2: 2 B x all frozen params; trainable 2T + 18T/N: adapters 2T whole
    z2 = make_plan(cfg, Setting(num_processes=2, gpu_mem_gib=1, zero_stage=2))
    assert (z2.rows["frozen parameters"], z2.rows["adapters"], z2.rows["gradients"]) == (2 * 23904, 2 * 1359, 4077)
    # no DeepSpeed: fp32 everything, DDP's bucket doubles the gradients
    z0 = make_plan(cfg, Setting(num_processes=2, gpu_mem_gib=1, zero_stage=0))
    assert (z0.rows["frozen parameters"], z0.rows["gradients"], z0.rows["optimizer states"]) == (4 * 23904, 8 * 1359,
                                                                                                 4 * 1359)
    # checkpointing: the blocks' inputs (2*8*17*32 each) and one block
    ck = make_plan(tiny(train={"activation_checkpointing": True}), Setting(2, 1, 3))
    assert ck.activations["kept"] == 2 * (2 * 8 * 17 * 32) + 88960


def test_what_does_not_fit_gets_the_changes_that_make_it_fit(capsys):
    from sdlora_ds.config import load_config
    g = load_config(os.path.join(ROOT, "configs", "imagenetr_b40_dinov2_g14.json"))
    p = make_plan(g, Setting(num_processes=1, gpu_mem_gib=24, zero_stage=2))
    assert not p.fits and p.micro == 128
    steps = what_fits(p)
    assert steps[0] == "--set train.activation_checkpointing=true" and "still" not in steps[-1]
    text = format_plan(p)
    assert "DOES NOT FIT" in text and "to fit: --set train.activation_checkpointing=true" in text
    assert what_fits(make_plan(g, Setting(num_processes=8, gpu_mem_gib=80))) == []
    assert train.main(["--config", os.path.join(ROOT, "configs", "demo_digits.json"), "--plan",
                       "--offload", "--zero-stage", "2"]) == 2
    assert "error: --offload" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["vit", "dinov2_swiglu"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_within_20_percent_of_a_measured_cpu_step(arch, checkpointing):
    bb = {"hidden_size": 64, "num_layers": 4, "num_heads": 4, "mlp_size": 256, "patch_size": 8, "image_size": 64}
    if arch != "vit":
        bb.update(arch="dinov2", swiglu=True, mlp_size=384, patch_size=7, image_size=56)
    cfg = tiny(backbone=bb, data={"image_size": bb["image_size"], "test_resize": bb["image_size"]},
               optim={"global_batch": 8}, dist={"mixed_precision": "no"},
               train={"activation_checkpointing": checkpointing})
    peak, saved = measured_step(cfg, 8)
    est = activation_bytes(cfg, architecture(cfg), 8)
    assert abs(est["total"] - peak) <= 0.2 * peak, (est, peak)
    if not checkpointing:  # what autograd keeps, tensor for tensor (the embeddings and head add ~2%)
        assert abs(est["kept"] - saved) <= 0.05 * saved, (est, saved)


def test_activation_estimate_in_bf16_within_20_percent_of_a_measured_cpu_step():
    """The whole model in bf16 (DeepSpeed's bf16 mode): 2-byte tensors, fp32 log-sum-exp, and x A_cur^T
    kept unmerged by the fused update."""
    import torch
    bb = {"hidden_size": 64, "num_layers": 4, "num_heads": 4, "mlp_size": 256, "patch_size": 8, "image_size": 64}
    cfg = tiny(backbone=bb, data={"image_size": 64, "test_resize": 64}, optim={"global_batch": 8},
               dist={"mixed_precision": "bf16"})
    peak, saved = measured_step(cfg, 8, dtype=torch.bfloat16)
    est = activation_bytes(cfg, architecture(cfg), 8)
    assert abs(est["total"] - peak) <= 0.2 * peak and abs(est["kept"] - saved) <= 0.05 * saved, (est, peak, saved)


def test_plan_bytes_are_reported_in_gib():
    p = make_plan(tiny(), Setting(1, 0.5, 3))
    assert p.setting.gpu_mem_gib * GIB == GIB / 2 and "of 0.5 GiB" in format_plan(p)


def test_an_undeclared_folder_backbone_is_read_from_its_config_json(tmp_path):
    from sdlora_ds.config import BackboneConfig
    from sdlora_ds.model.backbone import build_backbone
    dino = dict(arch="dinov2", hidden_size=32, num_layers=3, num_heads=2, mlp_size=64, patch_size=14, image_size=28)
    build_backbone(BackboneConfig(source="config", **dino)).save_pretrained(tmp_path / "bb")
    cfg = tiny(backbone={"source": "pretrained", "path": str(tmp_path / "bb")},
               data={"image_size": 28, "test_resize": 28})
    a = architecture(cfg)  # the config's fields say a 2-block ViT; the folder says otherwise
    assert (a.arch, a.layers, a.hidden, a.tokens) == ("dinov2", 3, 32, 5) and a.source.endswith("config.json")
    (tmp_path / "bb" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "NOT checked" in architecture(cfg).source  # not a backbone type: the fields, flagged unchecked


def test_a_method_the_plan_does_not_know_is_counted_as_sdlora_and_says_so():
    from dataclasses import replace
    cfg = tiny()
    other = replace(cfg, method="some_new_lora")  # e.g. a method added through a registry later
    p, q = make_plan(cfg, Setting(2, 1, 3)), make_plan(other, Setting(2, 1, 3))
    assert p.rows == q.rows
    assert "method 'some_new_lora' counted as SD-LoRA's" in format_plan(q) and "counted as" not in format_plan(p)


def test_zero3_counts_the_backbone_gathered_from_forward_to_backward_under_a_prefetch_bucket():
    """Measured on CPU processes (bench/zero_memory_full.py): with the launch file's prefetch bucket the
    layers the forward gathers stay gathered until their backward, up to the whole backbone (ViT-L on 2
    ranks: 1,152 of 1,161 MiB), and the all-gathers' flat buffers grow with it. The plan counts the
    partitioned backbone twice in 16-bit on several GPUs, the bucket alone on one (nothing is gathered)."""
    from sdlora_ds.config import load_config
    cfg = load_config(os.path.join(ROOT, "configs", "imagenetr_b40_vitl16.json"))
    one = make_plan(cfg, Setting(num_processes=1, zero_stage=3))
    two = make_plan(cfg, Setting(num_processes=2, zero_stage=3))
    working = 4 * two.arch.largest_layer
    assert one.rows["gathered layers + prefetch"] == working + 2 * 50_000_000
    partitioned = two.arch.params - sum(k for k in two.arch.small_params if k < 100_000)
    assert two.rows["gathered layers + prefetch"] == working + 2 * 2 * partitioned  # gathered + flat buffers
    assert 0.55 * GIB < 2 * partitioned < 0.6 * GIB  # ViT-L's 304M parameters in bf16
