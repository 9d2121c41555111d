"""The stacked low-rank update used by every SD-LoRA projection. Layers, bottom up: reference.py
(plain PyTorch Function, shared helpers) <- triton_stacked.py (kernels) <- selfcheck.py <- stacked_lowrank.py
(the public op)."""
from .stacked_lowrank import merge_weight, stacked_lowrank_linear

__all__ = ["merge_weight", "stacked_lowrank_linear"]
