"""Backbone loading, SD-LoRA projections, shared magnitudes and the growing classifier."""
from .backbone import build_backbone, find_targets
from .head import GrowingClassifier
from .model import SDLoRAModel
from .sdlora import Magnitudes, SDLoRALinear

__all__ = ["build_backbone", "find_targets", "GrowingClassifier", "SDLoRAModel", "Magnitudes", "SDLoRALinear"]
