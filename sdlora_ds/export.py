"""Export a trained model as a standard transformers image-classification folder.

Every direction and magnitude (SD-LoRA), or the LoRA update (seq_lora), is folded into the dense
weight of its projection, W' = W + sum_i (m_i + k_i + k_i^p) B_i A_i / norm_i (+ m_t B_t A_t), so the
exported model is a plain ViTForImageClassification / Dinov2ForImageClassification /
Dinov2WithRegistersForImageClassification (the backbone's architecture): the cost of the plain
model, loadable with `from_pretrained` or `pipeline("image-classification")`, predicting what the
trainer predicts.

transformers' DINOv2 classifiers read concat(CLS, mean of the patch tokens) (width 2d; the
registers variant leaves the register tokens out of the mean); ours reads the CLS token only, so the
head goes into the CLS half of the classifier weight and the patch half is zero: the same logits.

    out_dir/config.json               the backbone's config + id2label in class order (head row j = class_order[j])
    out_dir/model.safetensors         the merged weights and the classifier
    out_dir/preprocessor_config.json  the trainer's test transform (see `image_processor`)

Input: an in-memory model (`export_model`) or a run folder (`export_run`: run_dir/config.json +
run_dir/final_model.pt, which Trainer.finish writes with `save_final_model`).
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from .checkpoint_parts import load_model_payload, model_payload
from .config import DataConfig, RunConfig, load_config
from .distributed import is_partitioned
from .fileio import atomic_write
from .run_record import RUN_CONFIG, backbone_fingerprint, fingerprint_matches

FINAL_MODEL = "final_model.pt"
FORMAT = "sdlora-ds-final/1"


# ------------------------------------------------------------------ the run's final model file
def save_final_model(path: str, model, cfg: RunConfig, class_order: list, class_names: list,
                     fingerprint: Optional[list] = None) -> None:
    """Write what export (or a later evaluation) needs to rebuild `model` (call on rank 0).
    class_names: the shard index's names by class id. A backbone built from the config (random
    init, tests) cannot be rebuilt from a file, so its weights are saved too. fingerprint: the
    backbone's as loaded (the trainer's, taken before DeepSpeed bf16/fp16 casts the model, so that
    export finds the file the run was trained from); None: computed from `model`."""
    full = cfg.backbone.source == "config"
    payload = {"format": FORMAT, "method": cfg.method, "structure": model.structure(),
               "state": model.state_dict() if full else model.adapter_state_dict(), "full_state": full,
               "backbone_fingerprint": None if full else (fingerprint or backbone_fingerprint(model)),
               "class_order": list(class_order), "class_names": [class_names[c] for c in class_order]}
    payload["state"] = {k: v.detach().cpu() for k, v in payload["state"].items()}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def plain_model(model, fingerprint: list, is_main: bool, build_copy: Callable[[], object]):
    """The trained model with every tensor whole, for the final model file. Under ZeRO-3 `model` is
    partitioned: rank 0 rebuilds an ordinary copy (`build_copy()`, outside zero.Init) from the
    adapter state (gathered: collective) instead of gathering the whole backbone; None on the other
    ranks."""
    if not any(is_partitioned(p) for p in model.parameters()):
        return model
    payload = model_payload(model, fingerprint)
    if not is_main:
        return None
    copy = build_copy()
    load_model_payload(copy, payload, "the trained model's adapter state")
    copy.events = model.events
    return copy


def training_dir(run_dir: str, cfg: RunConfig) -> Optional[str]:
    """The folder training ran in, as the run folder's own path tells it: with a relative
    output_dir, the run folder is <that folder>/<output_dir>/<name> (runs/NAME -> the folder
    holding runs/). None when output_dir is absolute or the run folder does not end that way
    (moved or renamed)."""
    if os.path.isabs(cfg.output_dir):
        return None
    tail = os.path.normpath(os.path.join(cfg.output_dir, cfg.name)).split(os.sep)
    run = os.path.normpath(os.path.abspath(run_dir)).split(os.sep)
    if ".." in tail or len(run) <= len(tail) or run[-len(tail):] != tail:
        return None
    return os.sep.join(run[:-len(tail)]) or os.sep


def resolve_backbone_path(run_dir: str, cfg: RunConfig) -> None:
    """Make a relative backbone.path of a run's config absolute, for export from any directory.

    Training took it from its current directory, so it is looked up in the folder training ran in
    (`training_dir`), then in the current directory; the backbone fingerprint in final_model.pt then
    confirms it holds the weights the run trained on. ValueError naming both places if neither has it."""
    b = cfg.backbone
    if b.source != "pretrained" or not b.path or os.path.isabs(b.path):
        return
    places = [d for d in (training_dir(run_dir, cfg), os.getcwd()) if d]
    for d in places:
        if os.path.exists(os.path.join(d, b.path)):
            b.path = os.path.join(d, b.path)
            return
    raise ValueError(f"config field 'backbone.path' of {os.path.join(run_dir, 'config.json')!r}: {b.path!r} is "
                     f"relative and found in none of {places} (the folder training ran in, then the current "
                     f"directory); run export from the folder the run was trained from, or set an absolute "
                     f"backbone.path in that config.json")


def load_final_model(run_dir: str):
    """(model on the CPU in eval mode, RunConfig, payload) rebuilt from run_dir/config.json and
    run_dir/final_model.pt. A relative backbone.path is resolved by `resolve_backbone_path` (the
    folder training ran in, then the current directory), so export works from any directory."""
    from .model import build_model
    cfg_path, model_path = os.path.join(run_dir, RUN_CONFIG), os.path.join(run_dir, FINAL_MODEL)
    for p in (cfg_path, model_path):
        if not os.path.isfile(p):
            raise ValueError(f"run folder {run_dir!r} has no {os.path.basename(p)}; give the folder of a "
                             "finished run (runs/NAME)")
    cfg = load_config(cfg_path)
    resolve_backbone_path(run_dir, cfg)
    payload = torch.load(model_path, map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT:
        raise ValueError(f"{model_path!r} has format {payload.get('format')!r}, expected {FORMAT!r}")
    model = build_model(cfg)  # a random ('config') backbone is overwritten below: its weights are in the file
    model.restore_structure(payload["structure"])
    if payload["full_state"]:
        model.load_state_dict(payload["state"])
    else:
        missing, unexpected = model.load_state_dict(payload["state"], strict=False)
        if unexpected or set(missing) != set(model.pretrained_keys):
            raise ValueError(f"{model_path!r} does not match the model built from {cfg_path!r}: missing "
                             f"{sorted(set(missing) - model.pretrained_keys)[:4]}, unexpected {sorted(unexpected)[:4]}")
        if not fingerprint_matches(payload["backbone_fingerprint"], backbone_fingerprint(model), model):
            raise ValueError(f"config field 'backbone.path': {cfg.backbone.path!r} does not hold the weights the "
                             f"run was trained on (fingerprint mismatch); export with the original backbone file")
    return model.eval(), cfg, payload


# ------------------------------------------------------------------ transformers folder
def image_processor(data_cfg: DataConfig):
    """A ViTImageProcessor doing the trainer's test transform: RGB, resize of the SHORTER side to
    data.test_resize, center crop data.image_size, rescale 1/255, normalise only if data.mean is set.

    The classic ViTImageProcessor resizes to a fixed (h, w); transformers 5.x processors accept
    size={'shortest_edge': n} with do_center_crop, which is the trainer's Resize + CenterCrop. Exact
    for square inputs (the digits demo: bit-identical pixels with the default torchvision backend).
    For non-square inputs two small differences remain, both from transformers' implementation:
    the torchvision backend resizes the uint8 tensor (antialiased) where the trainer resizes the PIL
    image (at most 1 grey level apart), and its crop offset is floor((H - S) / 2) where torchvision's
    CenterCrop rounds: when the resized side minus the crop is odd the crops differ by one pixel
    in about half of those cases. Predictions can then differ on a few borderline images."""
    from transformers import ViTImageProcessor
    from transformers.image_utils import PILImageResampling
    resample = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR,
                "nearest": PILImageResampling.NEAREST}[data_cfg.interpolation]
    norm = data_cfg.mean is not None
    return ViTImageProcessor(do_resize=True, size={"shortest_edge": data_cfg.test_resize}, resample=resample,
                             do_center_crop=True, crop_size={"height": data_cfg.image_size, "width": data_cfg.image_size},
                             do_rescale=True, rescale_factor=1 / 255, do_normalize=norm,
                             image_mean=list(data_cfg.mean) if norm else None,
                             image_std=list(data_cfg.std) if norm else None, do_convert_rgb=True)


@torch.no_grad()
def merged_backbone_state(model) -> dict:
    """The pretrained backbone's state dict (plain ViTModel / Dinov2Model keys) with every adapted projection's
    weight replaced by its merged weight, fp32 on the CPU."""
    sd = model.state_dict()
    out = {k[len("backbone."):]: sd[k].detach().float().cpu() for k in model.pretrained_keys}
    for name, layer in zip(model.layer_names, model.layers):
        out[f"{name}.weight"] = layer.merged_weight().detach().float().cpu()
    return out


def _classifier_class(arch: str):
    """The transformers image-classification class of a backbone's model_type."""
    import transformers
    names = {"vit": "ViTForImageClassification", "dinov2": "Dinov2ForImageClassification",
             "dinov2_with_registers": "Dinov2WithRegistersForImageClassification"}
    if arch not in names:
        raise ValueError(f"export_model: no export for backbone model_type {arch!r}; supported: {sorted(names)}")
    return getattr(transformers, names[arch])


@torch.no_grad()
def export_model(model, class_names_in_order: list, data_cfg: DataConfig, out_dir: str,
                 verify: bool = True):
    """Write `model` (SDLoRAModel or a baseline) as a *ForImageClassification folder of its backbone's
    architecture; returns the transformers model. class_names_in_order[j] names head row j
    (= class_order[j]); names beyond the classes seen so far are ignored. verify: compare both
    models' logits on a random batch at data.image_size."""
    n = model.head.num_classes
    if n == 0:
        raise ValueError("export_model: the model has no classes yet (no task was started)")
    if len(class_names_in_order) < n:
        raise ValueError(f"export_model: {len(class_names_in_order)} class names for a head of {n} classes")
    names = [str(c) for c in class_names_in_order[:n]]
    bb_config = model.backbone.config
    cls = _classifier_class(bb_config.model_type)
    d = bb_config.to_dict()
    d.update(architectures=[cls.__name__], id2label={i: c for i, c in enumerate(names)},
             label2id={c: i for i, c in enumerate(names)})
    hf = cls(type(bb_config).from_dict(d)).eval()
    getattr(hf, hf.base_model_prefix).load_state_dict(merged_backbone_state(model), strict=True)
    w, dim = model.head.weight.detach().float().cpu(), bb_config.hidden_size  # (n, d)
    if hf.classifier.in_features == dim:  # ViT: the classifier reads the CLS token
        hf.classifier.weight.copy_(w)
    else:  # DINOv2: it reads concat(CLS, patch mean); ours is the CLS half, the patch half is zero
        assert hf.classifier.in_features == 2 * dim, hf.classifier
        hf.classifier.weight.zero_()
        hf.classifier.weight[:, :dim].copy_(w)
    hf.classifier.bias.copy_(model.head.bias.detach().float().cpu())
    if verify:
        _verify(model, hf, data_cfg.image_size)
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)  # config.json + model.safetensors
    image_processor(data_cfg).save_pretrained(out_dir)
    _usual_modes(out_dir, ("config.json", "model.safetensors", "preprocessor_config.json"))
    return hf


def _usual_modes(folder: str, names) -> None:
    """Give the files written the mode a plain open() would (0666 minus the umask): the weights file
    comes out 0600 (written through a private temporary file), which other users of a shared
    cluster cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~umask)


def check_out_dir(out_dir: str) -> None:
    """ValueError (one line) unless `out_dir` is a folder or can be created as one: checked before
    any work, so a file in the way does not fail the export after the model was loaded and verified."""
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ValueError(f"--out {out_dir!r} is a file, not a folder; give a folder path (it is created if "
                             f"missing), e.g. --out exported/NAME")
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise ValueError(f"--out {out_dir!r} is not writable (permissions or a read-only filesystem); give "
                             f"another folder")
        return
    parent = os.path.dirname(os.path.abspath(out_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--out {out_dir!r} cannot be created: {parent!r} is a file, not a folder; give a folder "
                         f"path, e.g. --out exported/NAME")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out_dir!r} cannot be created: {parent!r} is not writable; give another folder")


def _verify(model, hf, size: int) -> None:
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with model.merged_eval():
        want = model.export_logits(x.to(device)).float().cpu()
    model.train(was_training)
    got = hf(pixel_values=x).logits
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"export check failed: exported logits differ from the model's by "
                           f"{(got - want).abs().max().item():.3g}")


def export_run(run_dir: str, out_dir: str, verify: bool = True) -> str:
    """Export the final model of a finished run (see load_final_model); returns out_dir."""
    check_out_dir(out_dir)
    model, cfg, payload = load_final_model(run_dir)
    export_model(model, payload["class_names"], cfg.data, out_dir, verify=verify)
    return out_dir


def predict_labels(out_dir: str, images: list, batch_size: int = 64, device: Optional[str] = None) -> list:
    """Top-1 label names of PIL images through `pipeline("image-classification")` on the export."""
    from transformers import pipeline
    clf = pipeline("image-classification", model=out_dir, device=device)
    return [r[0]["label"] for r in clf(images, top_k=1, batch_size=batch_size)]
