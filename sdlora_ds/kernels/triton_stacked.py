"""Triton kernels for the stacked low-rank update (kernels, launchers and the autograd Function), above
reference.py (whose shared forward/backward it runs) and below selfcheck.py.

Two kernels replace the two places where the reference spends T-dependent work:
- `_merge_kernel`: W + B diag(s) A for one (BLOCK_O x BLOCK_I) tile of the weight per program,
  looping over the R stacked columns in BLOCK_R chunks, fp32 accumulation (exact fp32 products,
  `ieee`), one store in the compute dtype. The current task joins the stack as r extra columns of
  scale m_cur, so there is one launch per layer and forward whatever T is.
- `_colsum_kernel`: ds_j = sum_n (x A^T)[n, j] (dy B)[n, j] fused: a program owns BLOCK_N rows and
  BLOCK_R columns, builds both projection tiles in registers (fp32 accumulators over d_in and d_out)
  and reduces over its rows. The (BN x R) projections never reach memory; each row block writes
  one partial row, summed afterwards (deterministic, no atomics).
Everything else (the big GEMMs, the current task's dA/dB, the dense-gradient path when it is
cheaper) is cuBLAS through PyTorch, shared with the reference in reference.py.

Block sizes. `tl.arange` needs powers of two. Compiled `tl.dot` on NVIDIA (Triton 3.8,
backends/nvidia/compiler.py `min_dot_size`) needs K >= 8 for 32-bit operands (fp32/tf32), K >= 16
for 16-bit (bf16/fp16), K >= 32 for 8-bit; M and N only >= 1 (padded to the tensor-core tile).
Every `tl.dot` here multiplies fp32 operands, so K >= 8 is what compiles (merge: K = BLOCK_R;
colsum: K = BLOCK_K); all sizes are kept >= 16 so that a dot on 16-bit operands would compile too.
The interpreter checks none of this (it ran 8x8x8 in bf16): tests/test_triton_compile.py compiles
every kernel for sm_90 and sm_80 at the launchers' block sizes and checks registers, spills and
shared memory (kernels/compile_check.py). Loads are masked so that no width has to be a multiple of
a block. Tuning for a real GPU is still to do: the sizes are conservative defaults, chosen without
a GPU (0 spills and <= 24.6 kB shared memory at every checked shape).

This module imports on machines without a working triton; asking it for the Triton path there
raises an error that says so (there is no silent fallback to PyTorch).
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

from .reference import Operands, shared_backward, shared_forward

try:  # keep the package importable where triton is missing or broken (CPU-only installs)
    import triton
    import triton.language as tl
    _IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # noqa: BLE001 - any failure means "no Triton here", reported on use
    triton = tl = None
    _IMPORT_ERROR = exc

MERGE_BLOCK_O, MERGE_BLOCK_I, MERGE_BLOCK_R = 32, 32, 16
# BLOCK_R = 64: every column block re-reads its rows of x and dy, so wide column blocks keep that
# traffic at ceil(R / 64) passes (R = 190: 3); two 32 x 64 fp32 tiles stay within registers.
COLSUM_BLOCK_N, COLSUM_BLOCK_R, COLSUM_BLOCK_K = 32, 64, 32


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:

    @triton.jit
    def _merge_kernel(w_ptr, a_ptr, b_ptr, s_ptr, out_ptr, D_OUT, D_IN, R,
                      stride_wo, stride_wi, stride_ar, stride_ai, stride_bo, stride_br,
                      stride_oo, stride_oi,
                      BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr):
        pid_o, pid_i = tl.program_id(0), tl.program_id(1)
        ro = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)                      # (BLOCK_O,)
        ri = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)                      # (BLOCK_I,)
        mask_oi = (ro[:, None] < D_OUT) & (ri[None, :] < D_IN)
        acc = tl.load(w_ptr + ro[:, None] * stride_wo + ri[None, :] * stride_wi,
                      mask=mask_oi, other=0.0).to(tl.float32)             # (BLOCK_O, BLOCK_I)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)                               # (BLOCK_R,)
            s = tl.load(s_ptr + rr, mask=rr < R, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + ro[:, None] * stride_bo + rr[None, :] * stride_br,
                        mask=(ro[:, None] < D_OUT) & (rr[None, :] < R), other=0.0).to(tl.float32)
            a = tl.load(a_ptr + rr[:, None] * stride_ar + ri[None, :] * stride_ai,
                        mask=(rr[:, None] < R) & (ri[None, :] < D_IN), other=0.0).to(tl.float32)
            # batch-independent d_out x d_in x R work: exact fp32 products cost little here
            acc = tl.dot(b * s[None, :], a, acc, input_precision="ieee")
        tl.store(out_ptr + ro[:, None] * stride_oo + ri[None, :] * stride_oi,
                 acc.to(out_ptr.dtype.element_ty), mask=mask_oi)

    @triton.jit
    def _colsum_kernel(x_ptr, dy_ptr, a_ptr, b_ptr, part_ptr, BN, D_IN, D_OUT, R,
                       stride_xn, stride_xk, stride_dn, stride_dk, stride_ar, stride_ak,
                       stride_bk, stride_br,
                       BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr):
        pid_n, pid_r = tl.program_id(0), tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                      # (BLOCK_N,)
        rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)                      # (BLOCK_R,)
        rk = tl.arange(0, BLOCK_K)                                        # (BLOCK_K,)
        p = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)                # (x A^T) tile
        for k0 in range(0, D_IN, BLOCK_K):
            kk = k0 + rk
            xt = tl.load(x_ptr + rn[:, None] * stride_xn + kk[None, :] * stride_xk,
                         mask=(rn[:, None] < BN) & (kk[None, :] < D_IN), other=0.0)
            at = tl.load(a_ptr + rr[None, :] * stride_ar + kk[:, None] * stride_ak,
                         mask=(rr[None, :] < R) & (kk[:, None] < D_IN), other=0.0)  # A^T tile
            # both tiles in fp32 (the launcher already rounded the factors to the compute dtype):
            # 16-bit values are exact in tf32, so PRECISION='tf32' loses nothing for them, and
            # the interpreter would multiply bf16 bit patterns as integers in a bf16 tl.dot
            p = tl.dot(xt.to(tl.float32), at.to(tl.float32), p, input_precision=PRECISION)
        q = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)                # (dy B) tile
        for k0 in range(0, D_OUT, BLOCK_K):
            kk = k0 + rk
            dt = tl.load(dy_ptr + rn[:, None] * stride_dn + kk[None, :] * stride_dk,
                         mask=(rn[:, None] < BN) & (kk[None, :] < D_OUT), other=0.0)
            bt = tl.load(b_ptr + kk[:, None] * stride_bk + rr[None, :] * stride_br,
                         mask=(kk[:, None] < D_OUT) & (rr[None, :] < R), other=0.0)
            q = tl.dot(dt.to(tl.float32), bt.to(tl.float32), q, input_precision=PRECISION)
        part = tl.sum(p * q, axis=0)                                      # (BLOCK_R,) masked rows are 0
        tl.store(part_ptr + pid_n * R + rr, part, mask=rr < R)


def _require_triton(t: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError(f"impl='triton' needs a working triton installation: import failed "
                           f"({_IMPORT_ERROR!r}); use impl='reference' for the PyTorch path")
    if not t.is_cuda and not _interpreting():
        raise RuntimeError("impl='triton' got CPU tensors: Triton runs on CUDA tensors, or on CPU only "
                           "under the interpreter (TRITON_INTERPRET=1 set before triton is imported); "
                           "use impl='reference' for the PyTorch path on CPU")


class Launch(NamedTuple):
    """One kernel launch as the launchers build it: kernel[grid](*args, **meta). `out` is the
    tensor the launch writes. compile_check.py compiles exactly this (meta tensors stand in)."""
    kernel: object
    grid: tuple
    args: tuple
    meta: dict
    out: torch.Tensor


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def merge_launch(weight, a_f, b_f, s_f, a_c, b_c, m_c, include_cur: bool,
                 out_dtype: torch.dtype = torch.float32) -> Launch:
    """The merge launch of merge() (works on meta tensors: no data is read)."""
    if include_cur and a_c is not None:  # the current task is r more columns, scale m_cur
        a = torch.cat([a_f.to(a_c.dtype), a_c])                           # (R_f + r, d_in)
        b = torch.cat([b_f.to(b_c.dtype), b_c], 1)                        # (d_out, R_f + r)
        s = torch.cat([s_f.float(), m_c.float().reshape(1).expand(a_c.shape[0])])
    else:
        a, b, s = a_f, b_f, s_f.float()
    s = s.contiguous()
    d_out, d_in = weight.shape
    out = torch.empty(d_out, d_in, device=weight.device, dtype=out_dtype)
    grid = (_cdiv(d_out, MERGE_BLOCK_O), _cdiv(d_in, MERGE_BLOCK_I))
    args = (weight, a, b, s, out, d_out, d_in, a.shape[0],
            weight.stride(0), weight.stride(1), a.stride(0), a.stride(1),
            b.stride(0), b.stride(1), out.stride(0), out.stride(1))
    meta = dict(BLOCK_O=MERGE_BLOCK_O, BLOCK_I=MERGE_BLOCK_I, BLOCK_R=MERGE_BLOCK_R)
    return Launch(_merge_kernel, grid, args, meta, out)


def colsum_launch(x: torch.Tensor, dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> Launch:
    """The colsum launch of colsum(); `out` is the (row blocks, R) partial sums (meta tensors work)."""
    a, b = a.to(x.dtype), b.to(dy.dtype)  # round the factors as the reference does (R x d, cheap)
    bn, d_in = x.shape
    d_out, r = b.shape
    n_blocks = _cdiv(bn, COLSUM_BLOCK_N)
    part = torch.empty(n_blocks, r, device=x.device, dtype=torch.float32)  # (row blocks, R)
    # fp32 inputs: exact products, as cuBLAS gives by default (torch leaves TF32 off for matmul);
    # 16-bit inputs are exact in tf32, so they take the tensor-core path at no loss
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    grid = (n_blocks, _cdiv(r, COLSUM_BLOCK_R))
    args = (x, dy, a, b, part, bn, d_in, d_out, r,
            x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1))
    meta = dict(BLOCK_N=COLSUM_BLOCK_N, BLOCK_R=COLSUM_BLOCK_R, BLOCK_K=COLSUM_BLOCK_K, PRECISION=precision)
    return Launch(_colsum_kernel, grid, args, meta, part)


def merge(weight, a_f, b_f, s_f, a_c, b_c, m_c, include_cur: bool,
          out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Triton twin of reference._merge_torch: W + B diag(s) A, (d_out, d_in), accumulated
    in fp32 and stored once in out_dtype (no fp32 temporary for a bf16 forward)."""
    _require_triton(weight)
    k = merge_launch(weight, a_f, b_f, s_f, a_c, b_c, m_c, include_cur, out_dtype)
    k.kernel[k.grid](*k.args, **k.meta)
    return k.out


def colsum(x: torch.Tensor, dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Triton twin of reference._colsum_torch: (R,) fp32. x (BN, d_in), dy (BN, d_out)."""
    _require_triton(x)
    k = colsum_launch(x, dy, a, b)
    k.kernel[k.grid](*k.args, **k.meta)
    return k.out.sum(0)


class TritonStackedLowRankFunction(torch.autograd.Function):
    """Same maths and saved tensors as StackedLowRankFunction; merge and ds run as Triton kernels."""

    @staticmethod
    def forward(ctx, *operands):  # in Operands order
        op = Operands(*operands)
        _require_triton(op.x)
        return shared_forward(ctx, op, merge)

    @staticmethod
    def backward(ctx, dy):
        return tuple(shared_backward(ctx, dy, colsum))


def function():
    """The Function for impl='triton'; raises here, at dispatch, when Triton cannot be used."""
    if triton is None:
        _require_triton(torch.empty(0))
    return TritonStackedLowRankFunction
