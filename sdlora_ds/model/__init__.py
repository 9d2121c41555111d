"""Backbone loading, SD-LoRA projections, shared magnitudes, the growing classifier, the baselines.

`build_model(cfg)` is the one constructor the trainer and export use: config field `method` picks
the class through the method registry (registry.py; the methods are the modules of sdlora_ds/methods/).
"""
from .. import registry
from .backbone import build_backbone, find_targets
from .base import IncrementalViT
from .baselines import LinearProbeModel, LoRALinear, NCMModel, SeqLoRAModel
from .head import GrowingClassifier
from .model import SDLoRAModel
from .sdlora import Magnitudes, SDLoRALinear



def build_model(cfg) -> IncrementalViT:
    """The model of cfg.method, built from the config alone (same on every rank)."""
    return registry.get(cfg.method).model(cfg)


__all__ = ["build_backbone", "build_model", "find_targets", "GrowingClassifier", "IncrementalViT", "LinearProbeModel",
           "LoRALinear", "NCMModel", "SDLoRAModel", "SeqLoRAModel", "Magnitudes", "SDLoRALinear"]
