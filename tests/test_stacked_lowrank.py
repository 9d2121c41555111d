"""The reference stacked low-rank Function against SPEC section 1 and against plain autograd.

The oracle is written plainly: a loop over tasks computing
    y = W x + b + m_t B_t A_t x + sum_{i<t} (m_i + k_i) B_i A_i x / (||B_i||_F ||A_i||_F)
with a zero direction skipped, and autograd of the naive weight-space composition. Every gradient
the trainer uses (x, s_frozen -> magnitudes, A_cur, B_cur, m_cur) is compared, through both backward
paths (projections and the dense weight gradient), at d not a multiple of any block size.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from sdlora_ds.kernels import reference as ref
from sdlora_ds.kernels.stacked_lowrank import merge_weight, stacked_lowrank_linear

RANKS = (10, 8, 6)  # the SD-LoRA-RR schedule, cycled so that ranks mix inside one stack


def make_tasks(t_count, d_in, d_out, zero_task=None, seed=0):
    """Per-task factors as SPEC 1 describes them: A_i (r_i, d_in), B_i (d_out, r_i), m_i, k_i."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for i in range(t_count):
        r = RANKS[i % len(RANKS)]
        a = torch.randn(r, d_in, generator=g) / math.sqrt(d_in)
        b = torch.randn(d_out, r, generator=g) * 0.1
        if i == zero_task:
            b = torch.zeros_like(b)  # e.g. a direction folded away by SD-LoRA-KD
        m = torch.tensor(1.0 + 0.1 * i)
        k = torch.tensor(0.05 * i)
        tasks.append((a, b, m, k))
    return tasks


def per_task_formula(x, w, bias, frozen, frozen_mags, cur):
    """SPEC section 1, one task at a time. frozen: [(A_i, B_i, m_i, k_i)] for i < t with the
    magnitude tensors in frozen_mags; cur: (A_t, B_t, m_t) or None (no task in training)."""
    y = x @ w.t()
    if bias is not None:
        y = y + bias
    for (a, b, _, k), m in zip(frozen, frozen_mags):
        norm = torch.linalg.norm(b) * torch.linalg.norm(a)
        if norm == 0:
            continue  # a zero direction contributes nothing; never divide by zero
        y = y + (m + k) * ((x @ a.t()) @ b.t()) / norm
    if cur is not None:
        a_t, b_t, m_t = cur
        y = y + m_t * ((x @ a_t.t()) @ b_t.t())
    return y


def stack_frozen(frozen, frozen_mags, d_in, d_out):
    """The layer's view: A_f (R_f, d_in), B_f (d_out, R_f), s_f (R_f,) built from the magnitudes."""
    if not frozen:
        return torch.zeros(0, d_in), torch.zeros(d_out, 0), torch.zeros(0)
    scales = []
    for (a, b, _, k), m in zip(frozen, frozen_mags):
        norm = torch.linalg.norm(b) * torch.linalg.norm(a)
        scale = (m + k) / norm if norm > 0 else m * 0.0
        scales.append(scale.expand(a.shape[0]))
    a_f = torch.cat([a for a, _, _, _ in frozen])
    b_f = torch.cat([b for _, b, _, _ in frozen], dim=1)
    return a_f, b_f, torch.cat(scales)


@pytest.fixture(params=["proj", "dense"])
def backward_path(request, monkeypatch):
    """Force one of the two ds strategies so that both are checked at every shape."""
    monkeypatch.setattr(ref, "_dense_is_cheaper", lambda *a, **k: request.param == "dense")
    return request.param


def leaf(t):
    return t.clone().requires_grad_(True)


@pytest.mark.parametrize("t_count", [1, 3, 20])
@pytest.mark.parametrize("current", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("d_in,d_out", [(37, 50), (50, 37)])
def test_matches_per_task_formula(t_count, current, bias, d_in, d_out, backward_path):
    """T tasks of mixed ranks; current=True: the last one trains (T - 1 frozen), current=False:
    all T are frozen and no current task exists (a_cur = b_cur = m_cur = None)."""
    torch.manual_seed(t_count)
    tasks = make_tasks(t_count, d_in, d_out, zero_task=1 if t_count > 2 else None)
    w = torch.randn(d_out, d_in) * 0.2
    b = torch.randn(d_out) if bias else None
    x0 = torch.randn(3, 5, d_in)  # (B, N, d_in)
    n_frozen = t_count - 1 if current else t_count

    def run(use_ours):
        x = leaf(x0)
        mags = [leaf(m) for _, _, m, _ in tasks]
        cur = None
        if current:
            a_t, b_t, _, _ = tasks[-1]
            # a trained current task: B_t != 0 so that dA_t is not trivially zero
            cur = (leaf(a_t), leaf(b_t + 0.05), mags[-1])
        frozen, frozen_mags = tasks[:n_frozen], mags[:n_frozen]
        if use_ours:
            a_f, b_f, s_f = stack_frozen(frozen, frozen_mags, d_in, d_out)
            y = stacked_lowrank_linear(x, w, b, a_f, b_f, s_f, *(cur or (None, None, None)))
        else:
            y = per_task_formula(x, w, b, frozen, frozen_mags, cur)
        (y * torch.linspace(-1, 1, d_out)).sum().backward()  # a non-uniform upstream gradient
        cur_grads = [cur[0].grad, cur[1].grad] if cur else []
        return [y, x.grad] + cur_grads, [m.grad for m in mags]

    (ours, ours_m), (ref, ref_m) = run(True), run(False)
    assert len(ours) == len(ref) == (4 if current else 2)
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for i, (g_o, g_r) in enumerate(zip(ours_m, ref_m)):
        if i == 1 and t_count > 2:
            # zero direction: the oracle skips it, so it never sees m_1; ours gives it scale 0 * m_1
            assert g_r is None and torch.count_nonzero(g_o) == 0
        else:
            torch.testing.assert_close(g_o, g_r, rtol=1e-5, atol=1e-5)


def naive(x, w, bias, a_f, b_f, s_f, a_c, b_c, m_c):
    """Autograd of the weight-space composition (the placeholder the Function replaces)."""
    merged = w + (b_f * s_f) @ a_f
    if a_c is not None:
        merged = merged + m_c * (b_c @ a_c)
    return F.linear(x, merged, bias)


def random_stack(r_f, d_in, d_out, r_c, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g) * 0.2
    a_f = torch.randn(r_f, d_in, generator=g)
    b_f = torch.randn(d_out, r_f, generator=g) * 0.1
    s_f = torch.rand(r_f, generator=g)
    if r_f > 6:
        s_f[2:6] = 0.0  # a zero-direction block inside the stack
    cur = None
    if r_c:
        cur = (torch.randn(r_c, d_in, generator=g), torch.randn(d_out, r_c, generator=g) * 0.1,
               torch.tensor(0.7))
    return [t.to(dtype) for t in (w, a_f, b_f, s_f)], cur


@pytest.mark.parametrize("r_f,r_c", [(0, 10), (24, 6), (190, 10), (24, 0), (0, 0)])
@pytest.mark.parametrize("safe", [False, True])
def test_matches_naive_autograd_every_gradient(r_f, r_c, safe, backward_path):
    d_in, d_out = 37, 50
    (w, a_f, b_f, s_f), cur = random_stack(r_f, d_in, d_out, r_c)
    bias = torch.randn(d_out)
    x0 = torch.randn(2, 7, d_in)
    dy = torch.randn(2, 7, d_out)
    grads = []
    for fn in (naive, lambda *a: stacked_lowrank_linear(*a, impl="reference", safe_bf16=safe)):
        x, s = leaf(x0), leaf(s_f)
        c = [leaf(t) for t in cur] if cur else [None, None, None]
        y = fn(x, w, bias, a_f, b_f, s, *c)
        y.backward(dy)
        grads.append([y, x.grad, s.grad] + [t.grad for t in c if t is not None])
    assert len(grads[0]) == len(grads[1]) == 3 + (3 if cur else 0)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_needs_input_grad_is_respected():
    """Eval without grad, frozen magnitudes, an input that needs no grad: only what is asked."""
    (w, a_f, b_f, s_f), (a_c, b_c, m_c) = random_stack(24, 37, 50, 8)
    x = torch.randn(4, 37)
    ref = naive(x, w, None, a_f, b_f, s_f, a_c, b_c, m_c)
    with torch.no_grad():
        torch.testing.assert_close(stacked_lowrank_linear(x, w, None, a_f, b_f, s_f, a_c, b_c, m_c), ref)
    # block 0: x comes from the frozen patch embedding; magnitudes frozen; only A_cur trains
    a_leaf = leaf(a_c)
    y = stacked_lowrank_linear(x, w, None, a_f, b_f, s_f, a_leaf, b_c, m_c)
    y.sum().backward()
    a_ref = leaf(a_c)
    naive(x, w, None, a_f, b_f, s_f, a_ref, b_c, m_c).sum().backward()
    torch.testing.assert_close(a_leaf.grad, a_ref.grad)
    # nothing trainable at all but the input
    x_leaf = leaf(x)
    stacked_lowrank_linear(x_leaf, w, None, a_f, b_f, s_f, None, None, None).sum().backward()
    torch.testing.assert_close(x_leaf.grad, (w + (b_f * s_f) @ a_f).sum(0).expand(4, 37))


def test_cost_model_picks_projections_for_few_columns_and_dense_for_many():
    assert not ref._dense_is_cheaper(25_000, 768, 768, 190, 10)  # ViT-B, 20 tasks
    assert ref._dense_is_cheaper(25_000, 384, 384, 190, 10)      # ViT-S, 20 tasks
    assert not ref._dense_is_cheaper(25_000, 384, 384, 90, 10)   # ViT-S, 10 tasks
    assert ref._dense_is_cheaper(25_000, 384, 384, 400, 10)      # R_f > d
    assert not ref._dense_is_cheaper(25_000, 384, 384, 0, 10)    # current task only
    assert not ref._dense_is_cheaper(25_000, 384, 384, 0, 0)     # nothing to reduce


def test_bf16_safe_mode_keeps_a_small_current_update():
    """Task 0 on a bf16 weight: an update below half an ulp of W vanishes when merged (W is on the
    bf16 grid, so W + dW rounds back to W), and survives unmerged."""
    torch.manual_seed(0)
    d, n = 64, 2048
    w = (torch.sign(torch.randn(d, d)) * (1.5 + 0.2 * torch.randn(d, d))).bfloat16()  # ulp 2^-7
    a_f, b_f, s_f = torch.zeros(0, d), torch.zeros(d, 0), torch.zeros(0)
    a_c, b_c, m_c = torch.randn(4, d) / 4, torch.full((d, 4), 1e-3), torch.tensor(1.0)
    assert (m_c * b_c @ a_c).abs().max() < 2.0 ** -8  # every entry below half an ulp of W
    x = torch.randn(n, d).bfloat16()
    delta32 = (x.float() @ a_c.t()) @ b_c.t()  # what the current task adds, fp32 (n, d)
    base = stacked_lowrank_linear(x, w, None, a_f, b_f, s_f, None, None, None).float()

    def gain(safe):
        """Least-squares coefficient of the update in the bf16 output: 1 = fully there."""
        y = stacked_lowrank_linear(x, w, None, a_f, b_f, s_f, a_c, b_c, m_c, safe_bf16=safe)
        added = y.float() - base
        return ((added * delta32).sum() / (delta32 * delta32).sum()).item()

    assert gain(False) == 0.0  # merged: not a single output moved
    assert abs(gain(True) - 1.0) < 0.1  # unmerged: the update is there, up to output rounding
    assert gain(None) == gain(True)  # bf16 input defaults to the safe path


@pytest.mark.parametrize("safe", [False, True])
def test_bf16_gradients_track_fp32(safe, backward_path):
    (w, a_f, b_f, s_f), cur = random_stack(40, 37, 50, 8, seed=3)
    x0, dy = torch.randn(6, 37), torch.randn(6, 50)
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        x, s = leaf(x0.to(dt)), leaf(s_f)
        c = [leaf(t) for t in cur]  # trainable factors stay fp32 (mixed precision)
        y = stacked_lowrank_linear(x, w.to(dt), None, a_f.to(dt), b_f.to(dt), s, *c, safe_bf16=safe)
        y.backward(dy.to(dt))
        out[dt] = [y, x.grad, s.grad] + [t.grad for t in c]
        assert all(g.dtype == torch.float32 for g in out[dt][2:])  # grads in the parameters' dtype
    for got, want in zip(out[torch.bfloat16], out[torch.float32]):
        scale = want.abs().max()
        assert (got.float() - want).abs().max() <= 0.03 * scale + 1e-3


def test_autocast_bf16_runs_in_bf16_and_tracks_fp32():
    """Mixed precision (accelerate's bf16 = autocast): fp32 weights and inputs, bf16 compute."""
    (w, a_f, b_f, s_f), cur = random_stack(24, 37, 50, 6, seed=5)
    x0, dy = torch.randn(2, 9, 37), torch.randn(2, 9, 50)
    out = {}
    for use_autocast in (False, True):
        x, s, c = leaf(x0), leaf(s_f), [leaf(t) for t in cur]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
            y = stacked_lowrank_linear(x, w, torch.zeros(50), a_f, b_f, s, *c)
        assert y.dtype == (torch.bfloat16 if use_autocast else torch.float32)
        y.float().backward(dy)
        out[use_autocast] = [y, x.grad, s.grad] + [t.grad for t in c]
        assert x.grad.dtype == torch.float32 and all(t.grad.dtype == torch.float32 for t in c)
    for got, want in zip(out[True], out[False]):
        assert (got.float() - want).abs().max() <= 0.03 * want.abs().max() + 1e-3


def test_merge_weight_matches_composition():
    (w, a_f, b_f, s_f), (a_c, b_c, m_c) = random_stack(24, 37, 50, 6)
    torch.testing.assert_close(merge_weight(w, a_f, b_f, s_f, a_c, b_c, m_c),
                               w + (b_f * s_f) @ a_f + m_c * b_c @ a_c)
    assert merge_weight(w.bfloat16(), a_f, b_f, s_f, None, None, None).dtype == torch.float32


def test_interface_errors():
    (w, a_f, b_f, s_f), (a_c, b_c, m_c) = random_stack(4, 8, 8, 2)
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="impl"):
        stacked_lowrank_linear(x, w, None, a_f, b_f, s_f, a_c, b_c, m_c, impl="cuda")
    with pytest.raises(ValueError, match="frozen"):
        stacked_lowrank_linear(x, leaf(w), None, a_f, b_f, s_f, a_c, b_c, m_c)
    with pytest.raises(ValueError, match="all given or all None"):
        stacked_lowrank_linear(x, w, None, a_f, b_f, s_f, a_c, None, m_c)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    """impl='triton' must never fall back silently to PyTorch."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    (w, a_f, b_f, s_f), (a_c, b_c, m_c) = random_stack(4, 8, 8, 2)
    with pytest.raises(RuntimeError, match="[Tt]riton"):
        stacked_lowrank_linear(torch.randn(2, 8), w, None, a_f, b_f, s_f, a_c, b_c, m_c, impl="triton")
