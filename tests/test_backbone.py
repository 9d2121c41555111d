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
           "head.weight": torch.zeros(5, 32), "head.bias": torch.zeros(5)}
    for i in range(2):
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
