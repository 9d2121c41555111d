"""Backbone loading, SD-LoRA projections, shared magnitudes, the growing classifier, the baselines.

`build_model(cfg)` is the one constructor the trainer and export use: config field `method` picks
the class ('sdlora', also -RR/-KD/joint through config; 'seq_lora'; 'linear_probe'; 'ncm').
"""
from .backbone import build_backbone, find_targets
from .base import IncrementalViT
from .baselines import LinearProbeModel, LoRALinear, NCMModel, SeqLoRAModel
from .head import GrowingClassifier
from .model import SDLoRAModel
from .sdlora import Magnitudes, SDLoRALinear

MODELS = {cls.method: cls for cls in (SDLoRAModel, SeqLoRAModel, LinearProbeModel, NCMModel)}


def build_model(cfg) -> IncrementalViT:
    """The model of cfg.method, built from the config alone (same on every rank)."""
    if cfg.method not in MODELS:
        raise ValueError(f"config field 'method': got {cfg.method!r}; allowed: {sorted(MODELS)}")
    return MODELS[cfg.method](cfg)


__all__ = ["build_backbone", "build_model", "find_targets", "GrowingClassifier", "IncrementalViT", "LinearProbeModel",
           "LoRALinear", "MODELS", "NCMModel", "SDLoRAModel", "SeqLoRAModel", "Magnitudes", "SDLoRALinear"]
