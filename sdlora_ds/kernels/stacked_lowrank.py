"""The public op: `stacked_lowrank_linear` (y = x (W + B_f diag(s_f) A_f + m_cur B_cur A_cur)^T + b)
and `merge_weight`, used by every SD-LoRA projection.

It picks the implementation: 'reference' = the plain-PyTorch Function of reference.py (the CPU path;
the maths, the saved tensors and the 16-bit numerics are documented there); 'triton' = the same
Function with the merge and the ds reduction run by the kernels of triton_stacked.py; 'auto' =
Triton for CUDA tensors. The first CUDA use of the Triton path in a process (per dtype) is checked
against the reference (selfcheck.py); a mismatch stops the run with an error naming adapter.impl.
Layers, bottom up: reference.py <- triton_stacked.py <- selfcheck.py <- this module.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .reference import _LOW_PRECISION, StackedLowRankFunction, check_frozen, merge_weight

__all__ = ["merge_weight", "stacked_lowrank_linear", "StackedLowRankFunction"]


def stacked_lowrank_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           a_frozen: torch.Tensor, b_frozen: torch.Tensor, s_frozen: torch.Tensor,
                           a_cur: Optional[torch.Tensor], b_cur: Optional[torch.Tensor],
                           m_cur: Optional[torch.Tensor], impl: str = "auto",
                           safe_bf16: Optional[bool] = None) -> torch.Tensor:
    """x: (..., d_in); weight (d_out, d_in); a_frozen (R_f, d_in); b_frozen (d_out, R_f);
    s_frozen (R_f,); a_cur (r, d_in); b_cur (d_out, r); m_cur 0-dim. Returns (..., d_out).

    impl: 'auto' (Triton for CUDA tensors, reference otherwise), 'reference', 'triton'.
    safe_bf16: keep the current-task term unmerged (see the module docstring); None = only when x
    is bf16/fp16."""
    if impl not in ("auto", "reference", "triton"):
        raise ValueError(f"impl must be 'auto', 'reference' or 'triton', got {impl!r}")
    if (a_cur is None) != (b_cur is None) or (a_cur is None) != (m_cur is None):
        raise ValueError("a_cur, b_cur and m_cur must be all given or all None")
    check_frozen(weight=weight, bias=bias, a_frozen=a_frozen, b_frozen=b_frozen)
    lead, d_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, d_in)                                              # (BN, d_in)
    # Under autocast: cast x to the autocast dtype here (a differentiable cast, outside the
    # Function) and run the Function with autocast off, so that the merge really accumulates in
    # fp32 and the backward sees one dtype (autocast does not reach a custom backward).
    dev = x.device.type
    autocast = torch.is_autocast_enabled(dev)
    if autocast and x2.is_floating_point():
        x2 = x2.to(torch.get_autocast_dtype(dev))
    if safe_bf16 is None:
        safe_bf16 = x2.dtype in _LOW_PRECISION
    if impl == "triton" or (impl == "auto" and x.is_cuda):
        from . import selfcheck, triton_stacked  # lazy: CPU installs without a working triton still import
        fn = triton_stacked.function()  # raises a clear error when Triton cannot run here
        # first CUDA use per process and dtype: compare with the reference, stop on a mismatch
        selfcheck.guard(x2, weight)
    else:
        fn = StackedLowRankFunction
    with torch.autocast(dev, enabled=False) if autocast else contextlib.nullcontext():
        y = fn.apply(x2, weight, bias, a_frozen, b_frozen, s_frozen, a_cur, b_cur, m_cur, bool(safe_bf16))
    return y.reshape(*lead, y.shape[-1])
