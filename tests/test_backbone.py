"""Backbone loading from local files and the adapter-target rule."""
import pytest
import torch
from safetensors.torch import save_file

from sdlora_ds.config import BackboneConfig
from sdlora_ds.model.backbone import _rename, build_backbone, cls_features, find_targets

ARCH = dict(hidden_size=32, num_layers=2, num_heads=4, mlp_size=64, patch_size=8, image_size=32)


def test_config_built_backbone_is_frozen():
    vit = build_backbone(BackboneConfig(source="config", **ARCH))
    assert not any(p.requires_grad for p in vit.parameters())
    assert cls_features(vit, torch.rand(2, 3, 32, 32)).shape == (2, 32)


def test_folder_roundtrip(tmp_path):
    vit = build_backbone(BackboneConfig(source="config", **ARCH))
    vit.save_pretrained(tmp_path / "bb")
    again = build_backbone(BackboneConfig(source="pretrained", path=str(tmp_path / "bb")))
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(cls_features(again, x), cls_features(vit, x))


def to_timm(vit) -> dict:
    """Write a transformers 5.x ViT in timm's key layout (qkv fused), as timm checkpoints are."""
    sd = {k: v.clone() for k, v in vit.state_dict().items()}
    out = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"],
           "head.weight": torch.zeros(5, vit.config.hidden_size), "head.bias": torch.zeros(5)}
    for i in range(vit.config.num_hidden_layers):
        L = f"layers.{i}."
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([sd[f"{L}attention.{p}_proj.{kind}"] for p in "qkv"])
            out[f"blocks.{i}.attn.proj.{kind}"] = sd[f"{L}attention.o_proj.{kind}"]
            out[f"blocks.{i}.norm1.{kind}"] = sd[f"{L}layernorm_before.{kind}"]
            out[f"blocks.{i}.norm2.{kind}"] = sd[f"{L}layernorm_after.{kind}"]
            out[f"blocks.{i}.mlp.fc1.{kind}"] = sd[f"{L}mlp.fc1.{kind}"]
            out[f"blocks.{i}.mlp.fc2.{kind}"] = sd[f"{L}mlp.fc2.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}


def test_timm_safetensors_maps_onto_transformers(tmp_path):
    vit = build_backbone(BackboneConfig(source="config", **ARCH))
    if "layers.0.attention.q_proj.weight" not in vit.state_dict():
        pytest.skip("test writes 5.x-style keys")
    path = tmp_path / "vit_timm.safetensors"
    save_file(to_timm(vit), str(path))
    loaded = build_backbone(BackboneConfig(source="pretrained", path=str(path), num_heads=4))
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(cls_features(loaded, x), cls_features(vit, x))
    # a wrong head count changes the function; the shapes cannot tell, so the config must
    wrong = build_backbone(BackboneConfig(source="pretrained", path=str(path), num_heads=2))
    assert not torch.allclose(cls_features(wrong, x), cls_features(vit, x))


def test_hf_safetensors_file(tmp_path):
    vit = build_backbone(BackboneConfig(source="config", **ARCH))
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    loaded = build_backbone(BackboneConfig(source="pretrained", path=str(path), **ARCH))
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(cls_features(loaded, x), cls_features(vit, x))


def test_4x_and_5x_key_names_convert_both_ways():
    v5 = {"layers.3.attention.q_proj.weight": 1, "layers.0.mlp.fc1.bias": 2, "layers.1.layernorm_after.weight": 3}
    v4 = _rename(v5, 0, 1)
    assert set(v4) == {"encoder.layer.3.attention.attention.query.weight", "encoder.layer.0.intermediate.dense.bias",
                       "encoder.layer.1.layernorm_after.weight"}
    assert _rename(v4, 1, 0) == v5


def test_missing_paths_fail_with_the_field_named(tmp_path):
    with pytest.raises(ValueError, match="backbone.path"):
        build_backbone(BackboneConfig(source="pretrained", path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        build_backbone(BackboneConfig(source="pretrained", path=str(tmp_path / "empty")))


def test_target_rule_counts_two_per_block():
    vit = build_backbone(BackboneConfig(source="config", **ARCH))
    found = find_targets(vit, ["query", "value", "q_proj", "v_proj"])
    assert len(found) == 4
    with pytest.raises(ValueError, match="adapter.target_modules"):
        find_targets(vit, ["q_proj"])


# ------------------------------------------------------------------ DINOv2 / DINOv2 with registers
DINO = dict(hidden_size=32, num_layers=2, num_heads=2, mlp_size=64, patch_size=14, image_size=28)
DINO_ARCHS = ["dinov2", "dinov2_with_registers"]


def dino(arch, **over):
    torch.manual_seed(0)
    return build_backbone(BackboneConfig(source="config", arch=arch, **{**DINO, **over}))


@pytest.mark.parametrize("arch", DINO_ARCHS)
def test_dinov2_config_build_is_frozen_and_described(arch):
    from sdlora_ds.model.backbone import describe_backbone
    m = dino(arch, num_register_tokens=3)
    assert type(m).__name__ == {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}[arch]
    assert not any(p.requires_grad for p in m.parameters())
    assert m.config.mlp_ratio == 2 and m.encoder.layer[0].mlp.fc1.out_features == 64
    x = torch.rand(2, 3, 28, 28)
    out = m(pixel_values=x).last_hidden_state
    regs = 3 if arch == "dinov2_with_registers" else 0
    assert out.shape == (2, 1 + regs + 4, 32)  # CLS, registers, 2x2 patches
    torch.testing.assert_close(cls_features(m, x), out[:, 0])  # the CLS token, never a register
    d = describe_backbone(m)
    assert d == {"arch": arch, "class": type(m).__name__, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                 "patch_size": 14, "image_size": 28, "num_register_tokens": regs, "layerscale": True,
                 "num_parameters": sum(p.numel() for p in m.parameters())}
    assert describe_backbone(build_backbone(BackboneConfig(source="config", **ARCH)))["arch"] == "vit"


@pytest.mark.parametrize("arch", DINO_ARCHS)
def test_dinov2_adapters_on_exactly_query_value_and_only_adapters_train(arch):
    import torch.nn.functional as F
    from conftest import tiny_config_dict
    from sdlora_ds.config import config_from_dict
    from sdlora_ds.model import SDLoRAModel
    raw = tiny_config_dict(backbone={"arch": arch, **DINO}, data={"image_size": 28, "test_resize": 28})
    m = SDLoRAModel(config_from_dict(raw))
    # the default target_modules, whatever spelling the installed transformers uses
    want = [f"encoder.layer.{i}.attention.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    want_4x = [f"encoder.layer.{i}.attention.attention.{p}" for i in range(2) for p in ("query", "value")]
    assert m.layer_names in (want, want_4x)
    assert m.layers[0].in_features == m.layers[0].out_features == 32
    for t in range(2):
        m.start_task(t, 2)
        m.set_trainable()
        trainable = {n for n, p in m.named_parameters() if p.requires_grad}
        assert trainable == {f"backbone.{n}.{w}" for n in m.layer_names for w in ("a_cur", "b_cur")} | {
            "magnitudes.m", "head.weight", "head.bias"}
        loss = F.cross_entropy(m(torch.rand(4, 3, 28, 28))[:, 2 * t:], torch.randint(0, 2, (4,)))
        loss.backward()
        assert all(p.grad is None for n, p in m.named_parameters() if n not in trainable)
        assert all(p.grad is not None for n, p in m.named_parameters() if n in trainable)
        m.zero_grad(set_to_none=True)


def test_dinov2_target_rule_never_takes_key_or_output_projections():
    m = dino("dinov2")
    names = [f[0] for f in find_targets(m, ["query", "value", "q_proj", "v_proj"])]
    assert not any(k in n for n in names for k in ("k_proj", "key", "o_proj", "dense", "fc"))
    with pytest.raises(ValueError, match="adapter.target_modules"):
        find_targets(m, ["q_proj", "v_proj", "k_proj"])  # 3 per block


@pytest.mark.parametrize("arch", DINO_ARCHS)
def test_dinov2_folder_and_classification_folder_load(arch, tmp_path):
    from transformers import Dinov2ForImageClassification, Dinov2WithRegistersForImageClassification
    m = dino(arch)
    m.save_pretrained(tmp_path / "bb")
    x = torch.rand(2, 3, 28, 28)
    again = build_backbone(BackboneConfig(source="pretrained", path=str(tmp_path / "bb")))  # arch from config.json
    assert type(again) is type(m)
    torch.testing.assert_close(cls_features(again, x), cls_features(m, x))
    same = build_backbone(BackboneConfig(source="pretrained", path=str(tmp_path / "bb"), arch=arch))
    torch.testing.assert_close(cls_features(same, x), cls_features(m, x))
    clf_cls = Dinov2ForImageClassification if arch == "dinov2" else Dinov2WithRegistersForImageClassification
    torch.manual_seed(1)
    clf = clf_cls(m.config.__class__.from_dict({**m.config.to_dict(), "num_labels": 3}))
    clf.save_pretrained(tmp_path / "clf")
    inner = build_backbone(BackboneConfig(source="pretrained", path=str(tmp_path / "clf")))
    assert type(inner) is type(m) and not any("classifier" in k for k in inner.state_dict())
    torch.testing.assert_close(cls_features(inner, x), cls_features(getattr(clf, clf.base_model_prefix), x))


def test_folder_of_another_arch_is_a_clear_error(tmp_path):
    dino("dinov2").save_pretrained(tmp_path / "dino")
    build_backbone(BackboneConfig(source="config", **ARCH)).save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match=r"backbone.arch.*'vit'.*holds a 'dinov2'"):
        build_backbone(BackboneConfig(source="pretrained", path=str(tmp_path / "dino"), arch="vit"))
    with pytest.raises(ValueError, match=r"backbone.arch.*'dinov2_with_registers'.*holds a 'vit'"):
        build_backbone(BackboneConfig(source="pretrained", path=str(tmp_path / "vit"), arch="dinov2_with_registers"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="model_type 'bert'"):
        build_backbone(BackboneConfig(source="pretrained", path=str(tmp_path / "bert")))


def test_folder_with_missing_weights_is_refused(tmp_path):
    from safetensors.torch import load_file
    m = dino("dinov2")
    m.save_pretrained(tmp_path / "bb")
    f = tmp_path / "bb" / "model.safetensors"
    sd = load_file(str(f))
    sd.pop(next(k for k in sd if k.endswith("layer_scale1.lambda1")))
    sd.pop("embeddings.mask_token")  # unused at inference: allowed to be absent (a converted ONNX has none)
    save_file(sd, str(f))
    with pytest.raises(ValueError, match="lambda1"):
        build_backbone(BackboneConfig(source="pretrained", path=str(tmp_path / "bb")))


@pytest.mark.parametrize("arch", DINO_ARCHS)
def test_dinov2_safetensors_file_in_5x_and_4x_naming(arch, tmp_path):
    from sdlora_ds.model.backbone import _DINOV2_RENAMES, describe_backbone
    m = dino(arch, num_register_tokens=2)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    x = torch.rand(2, 3, 28, 28)
    # the shapes give width, depth, patch, grid, MLP and registers; the config gives only the head count
    cfg = dict(source="pretrained", num_heads=2)
    save_file(sd, str(tmp_path / "a.safetensors"))
    loaded = build_backbone(BackboneConfig(path=str(tmp_path / "a.safetensors"), **cfg))
    assert describe_backbone(loaded) == describe_backbone(m)
    torch.testing.assert_close(cls_features(loaded, x), cls_features(m, x))
    # a *ForImageClassification file in 4.x naming (attention.attention.query, ...), mask token absent
    v4 = {f"{m.base_model_prefix}.{k}": v for k, v in _rename(sd, 0, 1, _DINOV2_RENAMES).items()
          if k != "embeddings.mask_token"}
    assert any(".attention.attention.query." in k for k in v4)
    v4["classifier.weight"], v4["classifier.bias"] = torch.zeros(3, 64), torch.zeros(3)
    save_file(v4, str(tmp_path / "b.safetensors"))
    loaded4 = build_backbone(BackboneConfig(path=str(tmp_path / "b.safetensors"), arch=arch, **cfg))
    torch.testing.assert_close(cls_features(loaded4, x), cls_features(m, x))
    other = "dinov2" if arch != "dinov2" else "dinov2_with_registers"
    with pytest.raises(ValueError, match="backbone.arch"):
        build_backbone(BackboneConfig(path=str(tmp_path / "a.safetensors"), arch=other, **cfg))


@pytest.mark.parametrize("arch", DINO_ARCHS)
def test_dinov2_position_embeddings_interpolate_to_the_input_size(arch):
    import torch.nn.functional as F
    from sdlora_ds.model.backbone import check_input_size
    m = dino(arch, image_size=42).eval()  # native grid 3x3
    for size in (28, 56, 84):  # grids 2x2, 4x4, 6x6
        x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        a, b = cls_features(m, x), cls_features(m, x)
        assert a.shape == (2, 32) and torch.equal(a, b)  # deterministic
        # reference: the same model with the interpolated table stored at the new grid (no
        # interpolation in its forward): transformers really resamples, and precomputing is exact
        g = size // 14
        pos = m.embeddings.position_embeddings.detach()
        grid = pos[:, 1:].reshape(1, 3, 3, 32).permute(0, 3, 1, 2)
        # (transformers' registers variant resamples with antialiasing, plain Dinov2 without)
        grid = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False,
                             antialias=arch == "dinov2_with_registers")
        ref = dino(arch, image_size=size).eval()
        ref.load_state_dict({**m.state_dict(), "embeddings.position_embeddings":
                             torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, g * g, 32)], 1)})
        torch.testing.assert_close(cls_features(ref, x), a, rtol=0, atol=0)
    check_input_size(m, 84)
    with pytest.raises(ValueError, match="data.image_size.*patch size 14"):
        check_input_size(m, 50)
    with pytest.raises(ValueError, match="data.image_size.*built for 32"):
        check_input_size(build_backbone(BackboneConfig(source="config", **ARCH)), 64)


def test_dinov2_config_fields_are_validated():
    from sdlora_ds.config import ConfigError
    with pytest.raises(ConfigError, match="backbone.arch"):
        BackboneConfig(source="config", arch="dino").validate("backbone")
    with pytest.raises(ConfigError, match="backbone.mlp_size"):
        BackboneConfig(source="config", arch="dinov2", **{**DINO, "mlp_size": 50}).validate("backbone")
    with pytest.raises(ConfigError, match="backbone.num_register_tokens"):
        BackboneConfig(source="config", arch="dinov2_with_registers", num_register_tokens=0,
                       **DINO).validate("backbone")


# DINOv2 ViT-g/14's block at reduced depth: width 1536, 24 heads, SwiGLU MLP of 2/3 x 6144 = 4096.
GIANT = dict(hidden_size=1536, num_layers=2, num_heads=24, mlp_size=6144, patch_size=14, image_size=28, swiglu=True)


def test_giant_swiglu_backbone_roundtrips_exactly(tmp_path):
    import json

    from safetensors.torch import load_file
    g = dino("dinov2", **GIANT)
    mlp = g.encoder.layer[0].mlp
    assert (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features) == (4096, 4096, 4096)
    x = torch.rand(2, 3, 28, 28)
    want = cls_features(g, x)
    declared = BackboneConfig(source="pretrained", arch="dinov2", check_shapes=True,
                              **{k: v for k, v in GIANT.items()})
    g.save_pretrained(tmp_path / "bb")
    again = build_backbone(BackboneConfig(**{**declared.__dict__, "path": str(tmp_path / "bb")}))
    assert again.config.use_swiglu_ffn
    sd, sd2 = g.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert torch.equal(cls_features(again, x), want)
    # The published facebook/dinov2-giant folder keeps the original layout: one fused `weights_in`
    # (gate rows, then up rows) and `weights_out`, 4.x attention names. It must load to the same model.
    hub = {}
    for k, v in load_file(str(tmp_path / "bb" / "model.safetensors")).items():
        k = k.replace("attention.q_proj", "attention.attention.query").replace(
            "attention.k_proj", "attention.attention.key").replace("attention.v_proj", "attention.attention.value")
        k = k.replace("attention.o_proj", "attention.output.dense").replace("mlp.down_proj", "mlp.weights_out")
        if ".mlp.up_proj." in k:
            continue
        if ".mlp.gate_proj." in k:
            k = k.replace("mlp.gate_proj", "mlp.weights_in")
            v = torch.cat([v, sd[k.replace("mlp.weights_in", "mlp.up_proj")]], dim=0)  # (2h, d) / (2h,)
        hub[k] = v.contiguous()
    (tmp_path / "hub").mkdir()
    save_file(hub, str(tmp_path / "hub" / "model.safetensors"), metadata={"format": "pt"})
    with open(tmp_path / "hub" / "config.json", "w") as f:
        json.dump(g.config.to_dict(), f)
    from_hub = build_backbone(BackboneConfig(**{**declared.__dict__, "path": str(tmp_path / "hub")}))
    sd3 = from_hub.state_dict()
    assert sd3.keys() == sd.keys() and all(torch.equal(sd[k], sd3[k]) for k in sd)


def test_weights_that_disagree_with_declared_shapes_are_one_line_naming_the_field(tmp_path):
    m = dino("dinov2")
    m.save_pretrained(tmp_path / "bb")
    declared = dict(source="pretrained", path=str(tmp_path / "bb"), arch="dinov2", check_shapes=True, **DINO)
    assert build_backbone(BackboneConfig(**declared)).config.num_hidden_layers == DINO["num_layers"]
    for field, wrong in (("num_layers", 3), ("hidden_size", 64), ("swiglu", True), ("image_size", 56)):
        with pytest.raises(ValueError) as e:
            build_backbone(BackboneConfig(**{**declared, field: wrong}))
        msg = str(e.value)
        assert msg.startswith(f"config field 'backbone.{field}': the config declares {wrong!r}") and "\n" not in msg
    assert build_backbone(BackboneConfig(**{**declared, "num_layers": 3, "check_shapes": False}))  # the weights decide


def test_swiglu_and_check_shapes_are_validated():
    from sdlora_ds.config import ConfigError
    with pytest.raises(ConfigError, match="backbone.swiglu.*DINOv2 only"):
        BackboneConfig(source="config", swiglu=True).validate("backbone")
    with pytest.raises(ConfigError, match="backbone.check_shapes"):
        BackboneConfig(source="config", arch="vit", check_shapes=True).validate("backbone")
    with pytest.raises(ConfigError, match="backbone.check_shapes"):
        BackboneConfig(source="pretrained", path="x", check_shapes=True).validate("backbone")  # arch unknown


def test_vit_l16_timm_file_loads_exactly_with_its_declared_shapes(tmp_path):
    """configs/imagenetr_b40_vitl16.json's shapes (width 1024, 16 heads, MLP 4096, 224 px) at 1 block."""
    from sdlora_ds.config import load_config
    from conftest import ROOT
    declared = load_config(f"{ROOT}/configs/imagenetr_b40_vitl16.json").backbone
    shapes = {k: getattr(declared, k) for k in ("hidden_size", "num_heads", "mlp_size", "patch_size", "image_size")}
    torch.manual_seed(0)
    vit = build_backbone(BackboneConfig(source="config", num_layers=1, **shapes))
    if "layers.0.attention.q_proj.weight" not in vit.state_dict():
        pytest.skip("test writes 5.x-style keys")
    save_file(to_timm(vit), str(tmp_path / "vitl.safetensors"))
    cfg = BackboneConfig(**{**declared.__dict__, "path": str(tmp_path / "vitl.safetensors"), "num_layers": 1})
    loaded = build_backbone(cfg)
    sd, sd2 = vit.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with pytest.raises(ValueError, match="^config field 'backbone.num_layers': the config declares 24"):
        build_backbone(BackboneConfig(**{**cfg.__dict__, "num_layers": 24}))
