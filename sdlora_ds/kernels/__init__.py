"""The stacked low-rank update used by every SD-LoRA projection (see stacked_lowrank.py)."""
from .stacked_lowrank import merge_weight, stacked_lowrank_linear

__all__ = ["merge_weight", "stacked_lowrank_linear"]
