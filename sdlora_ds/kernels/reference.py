"""The bottom of the kernels package: the plain-PyTorch reference of the stacked low-rank update
y = x (W + B_f diag(s_f) A_f + m_cur B_cur A_cur)^T + b, its shared forward/backward (also run by the
Triton Function in triton_stacked.py, with the merge and the ds reduction swapped for kernels) and
the helpers both use. Nothing here imports the rest of the package.

Every SD-LoRA projection adds the frozen directions of all earlier tasks (stacked into A_f, B_f
with a per-column scale s_f) and the trainable current direction to a frozen dense weight. Looping
over tasks costs O(batch x T) per step and keeps per-task activations for autograd; here:

- forward merges the low-rank sum into the dense weight (d_out x d_in x R flops, independent of the
  batch) in fp32 and runs ONE GEMM, whatever the number of tasks;
- backward returns only what is trainable: dx through the merged weight, ds_f (one number per frozen
  column, carried back to the shared magnitudes by autograd), dA_cur, dB_cur, dm_cur. It never forms
  the dense frozen-weight gradient unless that is the cheaper way to get ds (`_dense_is_cheaper`).
- saved for backward: x, the merged weight (one d_out x d_in tensor per layer, the same at every T)
  and references to the factors, which are stored anyway; no per-task activation.

16-bit inputs: the merge accumulates in fp32 and rounds once; the current task stays unmerged
(`safe_bf16`) so that small updates are not rounded away (details at _LOW_PRECISION below).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

# 16-bit numerics, which path when:
# - the merge always accumulates in fp32 and rounds once, to the compute dtype (x's dtype, or the
#   autocast dtype under torch.autocast: x is cast there and the Function runs with autocast off);
# - the current task (`safe_bf16`): rounding the merged weight to 16 bits swallows a current-task
#   update smaller than half an ulp of the weight entry (B_cur starts at zero and grows slowly): on a
#   16-bit stored weight the forward would not see what training changes. Unmerged, the term goes in as
#   y = [x | x A_cur^T] [W_f | m B_cur]^T: one GEMM whose fp32 accumulator sums both terms before the
#   single rounding (extra 2 BN d r flops, r ~ 10, and a copy of x; x A_cur^T, BN x r, is saved for
#   the backward). safe_bf16=None (default): unmerged when the compute dtype is bf16/fp16, merged in
#   fp32, where rounding is 2^-24 and the skinny GEMMs would be pure cost; True/False force it;
# - the frozen terms are always merged: they are large next to the rounding. A change of s_f below
#   half a weight ulp does not show in a 16-bit forward when W itself is stored in 16 bits (with an
#   fp32 master weight under autocast, W + update is off the bf16 grid and the rounding dithers it);
#   the gradient of s_f is exact either way.
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def merge_weight(weight: torch.Tensor, a_frozen: torch.Tensor, b_frozen: torch.Tensor,
                 s_frozen: torch.Tensor, a_cur: Optional[torch.Tensor], b_cur: Optional[torch.Tensor],
                 m_cur: Optional[torch.Tensor]) -> torch.Tensor:
    """W + B_f diag(s_f) A_f + m_cur B_cur A_cur, shape (d_out, d_in), plain autograd.

    Accumulated in fp32 and returned in the promoted dtype of the inputs (e.g. fp32 for a bf16
    weight with fp32 factors), so that a caller merging for evaluation rounds once, at the end."""
    out_dtype = torch.result_type(weight, a_frozen) if a_frozen.numel() else weight.dtype
    if a_cur is not None:
        out_dtype = torch.promote_types(out_dtype, a_cur.dtype)
    w = _merge_torch(weight, a_frozen, b_frozen, s_frozen, a_cur, b_cur, m_cur, include_cur=True)
    return w.to(out_dtype)


def _merge_torch(weight, a_f, b_f, s_f, a_c, b_c, m_c, include_cur: bool,
                 out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Merge accumulated in fp32, rounded once to out_dtype: (d_out, d_in). Returns `weight`
    itself (no copy) when there is nothing to add and the dtype already matches."""
    w = weight.float()
    if a_f.shape[0]:
        w = torch.addmm(w, b_f.float() * s_f.float(), a_f.float())  # (d_out, R_f) @ (R_f, d_in)
    if include_cur and a_c is not None:
        w = torch.addmm(w, b_c.float() * m_c.float(), a_c.float())  # (d_out, r) @ (r, d_in)
    return w.to(out_dtype)


def _project(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x @ rows^T for a skinny factor given as rows (r, d): x (BN, d) -> (BN, r). B (d, r) goes in
    as B^T made contiguous (d x r elements, cheap): CPU BLAS ran `dy @ B` about 2x slower than this
    layout at r = 10 (measured, 1576 x 384)."""
    return x @ rows.to(x.dtype).t()


def _colsum_torch(x: torch.Tensor, dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ds_j = sum_n (x A^T)[n, j] (dy B)[n, j], fp32 (R,). x (BN, d_in), dy (BN, d_out)."""
    p = _project(x, a)                       # (BN, R)
    q = _project(dy, b.t().contiguous())     # (BN, R)
    return (p.float() * q.float()).sum(0)


# Skinny projections (N = R columns) run at a fraction of the efficiency of the square dy^T x GEMM
# (memory-bound, and on CPU the current task's r = 10 products are slower still). Measured on CPU
# (1 thread, BN = 1576, fwd+bwd of the op, ms proj/dense): d = 384: T=10 16.9/17.4, T=20 21.3/17.9;
# d = 768: T=20 60.6/67.6. A penalty of 1.5 on the projection count picks the faster path in all
# eight measured cases (T = 1, 5, 10, 20 at both widths). Not yet measured on a GPU.
_PROJ_PENALTY = 1.5


def _dense_is_cheaper(bn: int, d_in: int, d_out: int, r_f: int, r_c: int) -> bool:
    """Cost model (multiply-adds) for the backward's reductions; r_f frozen columns needing ds,
    r_c current columns needing dA/dB/dm (0 when nothing of the current task needs a gradient).

    projections: P = x A^T, Q = dy B for all r_f + r_c columns, then dA_cur = Q_c^T x and
                 dB_cur = dy^T P_c:                       BN (r_f + 2 r_c) (d_in + d_out)
    dense:       G = dy^T x (the frozen-weight gradient, BN d_in d_out) once, then G A^T and
                 B_cur^T G, batch-independent:            BN d_in d_out + d_in d_out (r_f + 2 r_c)
    For a square d x d layer that is 2 BN d R_f vs BN d^2: by flops projections win while
    R_f < d / 2; with the measured efficiency penalty (_PROJ_PENALTY) while R_f < ~d / 3. ViT-B
    (d = 768) at 20 tasks of rank 10 (R_f = 190) stays on projections, ViT-S (d = 384) switches to
    the dense gradient between 10 and 20 tasks. Memory: BN x R for projections, d x d for dense."""
    proj = _PROJ_PENALTY * bn * (r_f + 2 * r_c) * (d_in + d_out)
    dense = bn * d_in * d_out + d_in * d_out * (r_f + 2 * r_c)
    return dense < proj


class Operands(NamedTuple):
    """The Function's inputs by name, in `apply` order. The same shape names its
    `ctx.needs_input_grad` flags and the gradients its backward returns (None where there is none)."""
    x: Any = None             # (BN, d_in)
    weight: Any = None        # (d_out, d_in), frozen
    bias: Any = None          # (d_out,) or None, frozen
    a_f: Any = None           # (R_f, d_in), frozen directions
    b_f: Any = None           # (d_out, R_f)
    s_f: Any = None           # (R_f,), per-column scale (trainable: the magnitudes)
    a_c: Any = None           # (r, d_in) or None, current task (trainable)
    b_c: Any = None           # (d_out, r) or None (trainable)
    m_c: Any = None           # 0-dim or None (trainable)
    unmerged_cur: Any = None  # bool: keep the current term out of the merged weight (safe_bf16)


class _Saved(NamedTuple):
    """What the forward keeps for the backward (None where no gradient needs it)."""
    x: Any
    w: Any    # the merged weight the forward used
    a_f: Any
    b_f: Any
    s_f: Any
    a_c: Any
    b_c: Any
    m_c: Any
    p_c: Any  # x A_cur^T of the unmerged current term


def shared_forward(ctx, op: Operands, merge_fn: Callable) -> torch.Tensor:
    """Forward of the reference and the Triton Function; merge_fn is _merge_torch or its Triton
    twin. x (BN, d_in) -> (BN, d_out)."""
    x, a_c, b_c, m_c = op.x, op.a_c, op.b_c, op.m_c
    has_cur = a_c is not None
    unmerged_cur = bool(op.unmerged_cur) and has_cur
    w = merge_fn(op.weight, op.a_f, op.b_f, op.s_f, a_c, b_c, m_c, not unmerged_cur, x.dtype)  # (d_out, d_in)
    bias = None if op.bias is None else op.bias.to(x.dtype)
    p_c = None
    if unmerged_cur:
        p_c = _project(x, a_c)                                                         # (BN, r)
        # One GEMM over [x | p_c] and [W | m B_c]: both terms meet in the GEMM's fp32 accumulator
        # and the sum is rounded once. Adding a separately rounded 16-bit term to a 16-bit y would
        # swallow the update again (half an ulp of y is far larger than it).
        y = F.linear(torch.cat([x, p_c], 1), torch.cat([w, (b_c * m_c).to(x.dtype)], 1), bias)
    else:
        y = F.linear(x, w, bias)                                                       # (BN, d_out)
    need = Operands(*ctx.needs_input_grad)
    ctx.unmerged_cur = unmerged_cur
    ctx.has_cur = has_cur
    keep_x = (need.s_f and op.a_f.shape[0] > 0) or (has_cur and (need.a_c or need.b_c or need.m_c))
    ctx.save_for_backward(*_Saved(x if keep_x else None, w if need.x else None, op.a_f, op.b_f, op.s_f,
                                  a_c, b_c, m_c, p_c if keep_x else None))
    return y


def shared_backward(ctx, dy, colsum_fn: Callable) -> Operands:
    """Backward of both Functions: the gradients as an Operands (a tuple in `apply` order);
    colsum_fn(x, dy, A, B) -> (R,) fp32 is the per-column reduction."""
    x, w, a_f, b_f, s_f, a_c, b_c, m_c, p_c = _Saved(*ctx.saved_tensors)
    need = Operands(*ctx.needs_input_grad)
    need_x, need_s = need.x, need.s_f and a_f.shape[0] > 0
    need_cur = ctx.has_cur and (need.a_c or need.b_c or need.m_c)
    dy = dy.contiguous()                                                  # (BN, d_out)
    dx = ds = da = db = dm = None
    if need_x:
        dx = dy @ w                                                       # (BN, d_in)
    q_c = None
    if ctx.unmerged_cur and need_x:  # the current term is not inside w: add its dx explicitly
        q_c = _project(dy, b_c.t().contiguous())                          # (BN, r)
        dx = dx + (q_c * m_c.to(dy.dtype)) @ a_c.to(dy.dtype)
    if need_s or need_cur:
        (bn, d_out), d_in = dy.shape, x.shape[1]
        r_c = a_c.shape[0] if need_cur else 0
        if _dense_is_cheaper(bn, d_in, d_out, a_f.shape[0] if need_s else 0, r_c):
            g = (dy.t() @ x).float()                                      # (d_out, d_in)
            if need_s:
                ds = ((g @ a_f.float().t()) * b_f.float()).sum(0)        # (R_f,)
            if need_cur:
                ga = g @ a_c.float().t()                                  # (d_out, r)
                dm = (ga * b_c.float()).sum()
                db = ga * m_c.float()                                     # (d_out, r)
                da = (b_c.float().t() @ g) * m_c.float()                  # (r, d_in)
        else:
            if need_s:
                ds = colsum_fn(x, dy, a_f, b_f)                           # (R_f,)
            if need_cur:
                if p_c is None:
                    p_c = _project(x, a_c)                                # (BN, r)
                if q_c is None:
                    q_c = _project(dy, b_c.t().contiguous())              # (BN, r)
                dm = (p_c.float() * q_c.float()).sum()
                # (P^T dy)^T, not dy^T P: the same product, ~9x faster in CPU BLAS (measured)
                db = (p_c.t() @ dy).t().float() * m_c.float()             # (d_out, r)
                da = (q_c.t() @ x).float() * m_c.float()                  # (r, d_in)
    if ds is not None:
        ds = ds.to(s_f.dtype)
    elif need.s_f:
        ds = s_f.new_zeros(s_f.shape)  # R_f == 0: an empty gradient, as autograd would give
    if ctx.has_cur:
        da = da.to(a_c.dtype) if (da is not None and need.a_c) else None
        db = db.to(b_c.dtype) if (db is not None and need.b_c) else None
        dm = dm.to(m_c.dtype).reshape(m_c.shape) if (dm is not None and need.m_c) else None
    return Operands(x=dx, s_f=ds, a_c=da, b_c=db, m_c=dm)


class StackedLowRankFunction(torch.autograd.Function):
    """Reference (plain PyTorch) implementation; the CPU path and the oracle for the kernels.
    apply(*Operands): x, weight, bias, a_f, b_f, s_f, a_c, b_c, m_c, unmerged_cur."""

    @staticmethod
    def forward(ctx, *operands):
        return shared_forward(ctx, Operands(*operands), _merge_torch)

    @staticmethod
    def backward(ctx, dy):
        return tuple(shared_backward(ctx, dy, _colsum_torch))


def check_frozen(**tensors) -> None:
    """The Function returns no gradient for these: a caller that forgot to freeze one would train
    nothing there without noticing, so refuse loudly instead."""
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            if t is not None and t.requires_grad:
                raise ValueError(f"stacked_lowrank_linear: '{name}' must be frozen (requires_grad=False); "
                                 "only s_frozen, a_cur, b_cur and m_cur are trainable")
