"""What a run records about itself, for the programs that read a run folder later (sdlora-export,
-report, -diagnose) and for a resume:

    backbone_record       the backbone really loaded (architecture, size, where the weights came from)
    config_record         the config as run (the backbone's architecture fields from the loaded model),
                          written as the run folder's RUN_CONFIG (config.json) and into results.json
    backbone_fingerprint  sha256 of every pretrained tensor: a checkpoint or final_model.pt names the
                          weights it was trained on, and fingerprint_matches tells whether a backbone
                          is those weights

The checkpoint's own copy of the config (resume_config.json, the config as given) is another file:
checkpoint_parts.py registers it, resume.py compares it.
"""
from __future__ import annotations

from .config import config_to_dict
from .distributed import gathered
from .fileio import tensor_sha256

RUN_CONFIG = "config.json"  # in the run folder: config_record, the config as run (the trainer writes it)


def backbone_record(model, cfg) -> dict:
    """The backbone the run really uses, read from the loaded model (not the config's arch fields,
    which a pretrained backbone ignores): model/backbone.py's describe_backbone, plus the MLP width,
    the LayerNorm epsilon and where the weights came from."""
    from .model.backbone import describe_backbone
    bb, c = model.backbone, model.backbone.config
    rec = describe_backbone(bb)
    mlp = getattr(c, "intermediate_size", None) or int(round(getattr(c, "mlp_ratio", 0) * c.hidden_size))
    rec.update(mlp_size=int(mlp), layer_norm_eps=float(c.layer_norm_eps), source=cfg.backbone.source,
               path=cfg.backbone.path, weights_name=cfg.backbone.weights_name)
    return rec


def config_record(cfg, backbone: dict) -> dict:
    """The resolved config as run: the backbone section's architecture fields hold the loaded
    model's values (for source='pretrained' the configured ones are unused defaults). Loading it
    again builds the same run (sdlora-export does)."""
    d = config_to_dict(cfg)
    b = d["backbone"]
    for key in ("hidden_size", "num_layers", "num_heads", "mlp_size", "patch_size", "image_size", "layer_norm_eps"):
        b[key] = backbone[key]
    b["arch"] = backbone["arch"]
    b["num_register_tokens"] = backbone.get("num_register_tokens", 0)  # 0: an architecture without registers
    return d


def _per_pretrained_tensor(model, fn) -> list:
    """[fn(tensor) for every pretrained tensor, by name]. Under ZeRO-3 the backbone may be
    partitioned from construction on (transformers builds it inside zero.Init): each tensor is
    gathered in turn (collective; one tensor at a time, never the whole backbone)."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    out = []
    for k in sorted(model.pretrained_keys):
        with gathered([tensors[k]]):
            out.append(fn(tensors[k]))
    return out


def backbone_fingerprint(model) -> list:
    """sha256 of every pretrained tensor's bytes (fileio.tensor_sha256)."""
    return _per_pretrained_tensor(model, tensor_sha256)


def fingerprint_matches(saved: list, current: list, model) -> bool:
    """Does a saved fingerprint describe `model`'s backbone? `current` = backbone_fingerprint(model).
    Files written before the sha256 fingerprints hold float64 sums, whose last digits depend on the
    thread count: those are compared to a relative 1e-9 (a changed backbone moves them far more)."""
    if saved and isinstance(saved[0], float):
        sums = _per_pretrained_tensor(model, lambda t: float(t.detach().cpu().double().sum()))
        return len(sums) == len(saved) and all(abs(a - b) <= 1e-9 * max(1.0, abs(b)) for a, b in zip(sums, saved))
    return saved == current
