"""The frozen ViT backbone: built from a config (tests, demo pretraining) or loaded from local files.

Nothing is downloaded. `path` may be
  * a transformers folder (config.json + model.safetensors / pytorch_model.bin) of a ViTModel or
    ViTForImageClassification (the classifier is dropped), or
  * a single .safetensors file with transformers ViT keys, or with timm ViT keys
    (`blocks.N.attn.qkv.weight`, ...), which are mapped onto the transformers layout; timm files do
    not carry the head count, so `backbone.num_heads` must be right for them.

Which projections get adapters (the documented rule): every nn.Linear inside the backbone whose own
attribute name is in `adapter.target_modules`. transformers 4.x names the query/value projections
`encoder.layer.N.attention.attention.query/value`, 5.x `layers.N.attention.q_proj/v_proj`; the
default list holds both spellings. The rule must find exactly 2 per block or the run stops.
"""
from __future__ import annotations

import os
import re

import torch
from torch import nn
from transformers import ViTConfig, ViTModel

from ..config import BackboneConfig


def vit_config(cfg: BackboneConfig) -> ViTConfig:
    return ViTConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                     num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_size,
                     image_size=cfg.image_size, patch_size=cfg.patch_size, qkv_bias=True,
                     layer_norm_eps=cfg.layer_norm_eps, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)


def _missing(path: str) -> ValueError:
    return ValueError(f"config field 'backbone.path': {path!r} does not exist; point it at a local "
                      "transformers ViT folder or a .safetensors file (nothing is downloaded; for the demo "
                      "run `python launch/pretrain_demo_backbone.py` first)")


def build_backbone(cfg: BackboneConfig) -> ViTModel:
    """A ViTModel without pooler, every parameter frozen (requires_grad=False)."""
    if cfg.source == "config":
        model = ViTModel(vit_config(cfg), add_pooling_layer=False)
    elif os.path.isdir(cfg.path):
        if not os.path.isfile(os.path.join(cfg.path, "config.json")):
            raise ValueError(f"config field 'backbone.path': folder {cfg.path!r} has no config.json; "
                             "expected a transformers ViT folder (save_pretrained output)")
        model = ViTModel.from_pretrained(cfg.path, add_pooling_layer=False, local_files_only=True)
    elif os.path.isfile(cfg.path):
        if not cfg.path.endswith(".safetensors"):
            raise ValueError(f"config field 'backbone.path': {cfg.path!r} is a file but not .safetensors; "
                             "convert the checkpoint to safetensors or give a transformers folder")
        model = _from_safetensors(cfg)
    else:
        raise _missing(cfg.path)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ------------------------------------------------------------------ single safetensors files
def _from_safetensors(cfg: BackboneConfig) -> ViTModel:
    from safetensors.torch import load_file
    sd = load_file(cfg.path)
    if "cls_token" in sd:  # timm layout: derive the architecture from the tensor shapes
        sd, arch = _timm_to_hf(sd, cfg)
    else:
        sd = {re.sub(r"^(vit\.)", "", k): v for k, v in sd.items() if not k.startswith("classifier.")}
        arch = cfg
    model = ViTModel(vit_config(arch), add_pooling_layer=False)
    model_keys = set(model.state_dict())
    sd = _to_model_naming(sd, model_keys)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"backbone file {cfg.path!r} does not match a ViT of the configured shape: "
                         f"missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}; check "
                         "backbone.num_heads/hidden_size/num_layers/... or the file")
    return model


def _timm_to_hf(sd: dict, cfg: BackboneConfig):
    """timm ViT keys -> transformers 5.x keys; architecture read from the shapes."""
    d = sd["cls_token"].shape[-1]
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    patch = sd["patch_embed.proj.weight"].shape[-1]
    n_tokens = sd["pos_embed"].shape[1]
    image = int(round((n_tokens - 1) ** 0.5)) * patch
    mlp = sd["blocks.0.mlp.fc1.weight"].shape[0]
    arch = BackboneConfig(source="config", hidden_size=d, num_layers=layers, num_heads=cfg.num_heads,
                          mlp_size=mlp, patch_size=patch, image_size=image, layer_norm_eps=cfg.layer_norm_eps)
    arch.validate("backbone")
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(layers):
        for t, h in names.items():
            for kind in ("weight", "bias"):
                out[f"layers.{i}.{h}.{kind}"] = sd[f"blocks.{i}.{t}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, v = sd[f"blocks.{i}.attn.qkv.{kind}"].chunk(3, dim=0)  # (3d, ...) -> 3 x (d, ...)
            out[f"layers.{i}.attention.q_proj.{kind}"] = q
            out[f"layers.{i}.attention.k_proj.{kind}"] = k
            out[f"layers.{i}.attention.v_proj.{kind}"] = v
    return out, arch


# (5.x pattern, 4.x pattern) pairs for the parts of a block whose names changed between releases.
_RENAMES = [("layers.{i}.attention.q_proj", "encoder.layer.{i}.attention.attention.query"),
            ("layers.{i}.attention.k_proj", "encoder.layer.{i}.attention.attention.key"),
            ("layers.{i}.attention.v_proj", "encoder.layer.{i}.attention.attention.value"),
            ("layers.{i}.attention.o_proj", "encoder.layer.{i}.attention.output.dense"),
            ("layers.{i}.mlp.fc1", "encoder.layer.{i}.intermediate.dense"),
            ("layers.{i}.mlp.fc2", "encoder.layer.{i}.output.dense"),
            ("layers.{i}.layernorm", "encoder.layer.{i}.layernorm")]


def _rename(sd: dict, src: int, dst: int) -> dict:
    table = [(re.compile("^" + re.escape(pair[src]).replace(r"\{i\}", r"(\d+)")),
              pair[dst].replace("{i}", r"\1")) for pair in _RENAMES]
    out = {}
    for k, v in sd.items():
        for pat, rep in table:
            k = pat.sub(rep, k)
        out[k] = v
    return out


def _to_model_naming(sd: dict, model_keys: set) -> dict:
    """Rename 5.x-style keys to 4.x style or back, to match the installed transformers."""
    for candidate in (sd, _rename(sd, 0, 1), _rename(sd, 1, 0)):
        if set(candidate) <= model_keys:
            return candidate
    return sd  # load_state_dict then reports what does not match


# ------------------------------------------------------------------ adapter targets
def find_targets(backbone: nn.Module, target_modules: list) -> list:
    """[(qualified name, parent module, attribute, nn.Linear)] chosen by the rule in the docstring."""
    found = []
    for name, module in backbone.named_modules():
        for attr, child in module.named_children():
            if attr in target_modules and isinstance(child, nn.Linear):
                found.append((f"{name}.{attr}" if name else attr, module, attr, child))
    n_blocks = backbone.config.num_hidden_layers
    if len(found) != 2 * n_blocks:
        raise ValueError(f"config field 'adapter.target_modules': {target_modules} matched {len(found)} "
                         f"nn.Linear layers ({[f[0] for f in found][:6]}...), expected 2 per block x {n_blocks} "
                         "blocks (query and value); list the attribute names your transformers version uses")
    return found


def cls_features(backbone: ViTModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> (B, d): the final-LayerNorm CLS token, as timm's ViT classifier input."""
    return backbone(pixel_values=pixel_values).last_hidden_state[:, 0]
