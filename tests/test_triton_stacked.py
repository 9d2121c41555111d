"""Triton kernels (under TRITON_INTERPRET=1, on CPU) against the PyTorch reference.

Shapes are tiny and awkward on purpose: no width is a multiple of a block (blocks are 16/32), R
spans several BLOCK_R chunks with a ragged tail, and R = 0 is included. The interpreter runs each
program in numpy, so large shapes would only cost time; the slow-marked test is the one bigger case.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton` (and our kernels)

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from sdlora_ds.kernels import reference as ref  # noqa: E402
from sdlora_ds.kernels import stacked_lowrank as sl  # noqa: E402
from sdlora_ds.kernels import triton_stacked as ts  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if not isinstance(ts._merge_kernel, InterpretedFunction):
    # something imported the kernels before this file set the variable: decorate them again
    ts = importlib.reload(ts)

# (rtol, atol) relative to the largest |value| of each compared tensor
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def close(got, want, dtype):
    """Max error scaled by the reference's largest entry: one number per dtype, no per-test fiddling."""
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.numel() == 0:
        return
    scale = want.float().abs().max().clamp_min(1e-6)
    err = (got.float() - want.float()).abs().max() / scale
    assert err <= TOL[dtype], f"relative error {err:.2e} > {TOL[dtype]:.0e} ({dtype})"


def factors(r_f, d_in, d_out, r_c, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g) * 0.2
    a_f = torch.randn(r_f, d_in, generator=g) / d_in ** 0.5
    b_f = torch.randn(d_out, r_f, generator=g) * 0.1
    s_f = torch.rand(r_f, generator=g) + 0.5
    s_f[: min(r_f, 3)] = 0.0  # a zero direction
    cur = (torch.randn(r_c, d_in, generator=g) / d_in ** 0.5, torch.randn(d_out, r_c, generator=g) * 0.1,
           torch.tensor(0.8)) if r_c else (None, None, None)
    return w, a_f, b_f, s_f, cur


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r_f,r_c", [(0, 0), (0, 1), (24, 6), (33, 0)])  # R = 33: one column past two blocks
def test_merge_kernel(dtype, r_f, r_c):
    w, a_f, b_f, s_f, (a_c, b_c, m_c) = factors(r_f, 37, 50, r_c)
    w = w.to(dtype)
    got = ts.merge(w, a_f, b_f, s_f, a_c, b_c, m_c, True, dtype)
    want = ref._merge_torch(w, a_f, b_f, s_f, a_c, b_c, m_c, True, dtype)
    close(got, want, dtype)
    if r_f == 0 and r_c == 0:
        assert torch.equal(got, w)  # nothing to add: an exact copy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bn,r", [(45, 17), (7, 70), (33, 1)])  # r = 70: two column blocks
def test_colsum_kernel(dtype, bn, r):
    g = torch.Generator().manual_seed(bn * r)
    x = torch.randn(bn, 37, generator=g).to(dtype)
    dy = torch.randn(bn, 50, generator=g).to(dtype)
    a, b = torch.randn(r, 37, generator=g), torch.randn(50, r, generator=g)
    want = ref._colsum_torch(x, dy, a, b)
    if dtype != torch.float32:  # the kernel keeps projections in fp32; compare with that
        want = ((x.float() @ a.to(dtype).float().t()) * (dy.float() @ b.to(dtype).float())).sum(0)
    close(ts.colsum(x, dy, a, b), want, torch.float32)


def run(impl, dtype, r_f, r_c, bias, safe, x_shape=(3, 5), d_in=37, d_out=50, seed=0):
    """Forward + backward; returns y and every gradient the trainer uses."""
    w, a_f, b_f, s_f, cur = factors(r_f, d_in, d_out, r_c, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*x_shape, d_in, generator=g).to(dtype).requires_grad_(True)
    dy = torch.randn(*x_shape, d_out, generator=g).to(dtype)
    b = (torch.randn(d_out, generator=g) if bias else None)
    s = s_f.clone().requires_grad_(True)
    c = [t.clone().requires_grad_(True) if t is not None else None for t in cur]
    y = sl.stacked_lowrank_linear(x, w.to(dtype), b, a_f.to(dtype), b_f.to(dtype), s, *c,
                                  impl=impl, safe_bf16=safe)
    y.backward(dy)
    return [y, x.grad, s.grad] + [t.grad for t in c if t is not None]


@pytest.fixture(params=["proj", "dense"])
def backward_path(request, monkeypatch):
    monkeypatch.setattr(ref, "_dense_is_cheaper", lambda *a, **k: request.param == "dense")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r_f,r_c,bias", [(0, 10, True), (24, 6, False), (18, 0, True)])
def test_function_matches_reference(dtype, r_f, r_c, bias, backward_path):
    safe = dtype != torch.float32
    got = run("triton", dtype, r_f, r_c, bias, safe)
    want = run("reference", dtype, r_f, r_c, bias, safe)
    assert len(got) == len(want) == 3 + (3 if r_c else 0)
    for g_, w_ in zip(got, want):
        close(g_, w_, dtype)


def test_function_fp32_merged_and_safe_agree():
    merged = run("triton", torch.float32, 24, 6, True, safe=False)
    safe = run("triton", torch.float32, 24, 6, True, safe=True)
    for g_, w_ in zip(merged, safe):
        close(g_, w_, torch.float32)


def test_non_contiguous_input():
    w, a_f, b_f, s_f, (a_c, b_c, m_c) = factors(20, 37, 50, 4)
    x = torch.randn(37, 9).t()  # (9, 37) with strides (1, 9)
    outs = [sl.stacked_lowrank_linear(x, w, None, a_f, b_f, s_f, a_c, b_c, m_c, impl=i)
            for i in ("triton", "reference")]
    close(outs[0], outs[1], torch.float32)


def test_auto_uses_reference_on_cpu(monkeypatch):
    """'auto' never picks Triton for CPU tensors, even under the interpreter."""
    monkeypatch.setattr(ts, "function", lambda: pytest.fail("auto dispatched to Triton on CPU"))
    w, a_f, b_f, s_f, cur = factors(4, 8, 8, 2)
    sl.stacked_lowrank_linear(torch.randn(2, 8), w, None, a_f, b_f, s_f, *cur)


def test_missing_triton_raises(monkeypatch):
    monkeypatch.setattr(ts, "triton", None)
    with pytest.raises(RuntimeError, match="working triton"):
        ts.function()


@pytest.mark.slow
def test_function_twenty_tasks_larger_shape():
    """20 tasks of ranks 10/8/6 (R_f = 158), d = 100, BN = 130: several blocks on every axis."""
    r_f = sum((10, 8, 6)[i % 3] for i in range(19))
    for dtype in (torch.float32, torch.bfloat16):
        got = run("triton", dtype, r_f, 6, True, None, x_shape=(2, 65), d_in=100, d_out=100)
        want = run("reference", dtype, r_f, 6, True, None, x_shape=(2, 65), d_in=100, d_out=100)
        for g_, w_ in zip(got, want):
            close(g_, w_, dtype)
