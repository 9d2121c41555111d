"""SD-LoRA projection vs the explicit per-task formula of SPEC section 1."""
import pytest
import torch
from torch import nn

from sdlora_ds.model.sdlora import Magnitudes, SDLoRALinear


def explicit(x, W, b, dirs, m, k, norm):
    """y = W x + b + m_t B_t A_t x + sum_{i<t} (m_i + k_i) B_i A_i x / norm_i, looping over tasks."""
    y = x @ W.T + b
    t = len(dirs) - 1
    for i, (A, B) in enumerate(dirs):
        if i == t:
            y = y + m[i] * (x @ A.T @ B.T)
            continue
        n = B.norm() * A.norm() if norm == "factors" else (B @ A).norm()
        if n == 0:
            continue  # zero direction: skipped, never divided by zero
        y = y + (m[i] + k[i]) * (x @ A.T @ B.T) / n
    return y


@pytest.mark.parametrize("norm", ["factors", "product"])
@pytest.mark.parametrize("ranks,zero_task", [([4], None), ([3, 5], 0), ([10, 8, 6, 3, 2], 2)])
def test_projection_equals_per_task_formula(ranks, zero_task, norm):
    torch.manual_seed(0)
    d_in, d_out = 13, 11
    base = nn.Linear(d_in, d_out)
    mags = Magnitudes()
    layer = SDLoRALinear(base, mags, norm=norm)
    dirs = []
    for t, r in enumerate(ranks):
        layer.freeze_current()
        layer.add_direction(r, generator=torch.Generator().manual_seed(t))
        mags.grow(1.0, reset=True)
        with torch.no_grad():
            if t != zero_task:
                layer.b_cur.normal_()
            else:
                layer.b_cur.zero_()
        dirs.append((layer.a_cur.detach().clone(), layer.b_cur.detach().clone()))
    with torch.no_grad():
        mags.m.copy_(torch.rand(len(ranks), dtype=torch.float32) + 0.5)
        mags.k.copy_(torch.rand(len(ranks), dtype=torch.float32))
        mags.k[-1] = 0.0  # k of the current task is always 0
    x = torch.randn(3, 7, d_in, dtype=torch.float32)
    want = explicit(x, base.weight, base.bias, dirs, mags.m.detach(), mags.k, norm)
    tol = dict(rtol=1e-5, atol=1e-5)  # fp32; a wrong formula is off by O(1)
    torch.testing.assert_close(layer(x), want, **tol)
    with layer.merged():
        torch.testing.assert_close(layer(x), want, **tol)
    torch.testing.assert_close(x @ (base.weight + layer.delta_weight()).T + base.bias, want, **tol)
    torch.testing.assert_close(layer.merged_weight(), base.weight + layer.delta_weight(), rtol=0, atol=1e-6)


def test_zero_direction_has_zero_inverse_norm_and_no_nan():
    base = nn.Linear(6, 5)
    mags = Magnitudes()
    layer = SDLoRALinear(base, mags)
    layer.add_direction(2)
    mags.grow(1.0, True)
    layer.freeze_current()  # B is still zero
    assert layer.frozen_inv_norm.tolist() == [0.0]
    layer.add_direction(2)
    mags.grow(1.0, True)
    y = layer(torch.randn(2, 6))
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(mags.m.grad).all()


def test_magnitude_reset_and_keep():
    mags = Magnitudes()
    mags.grow(0.8, reset=True)
    with torch.no_grad():
        mags.m.fill_(2.0)
    mags.grow(0.8, reset=False)
    assert mags.m.tolist() == pytest.approx([2.0, 0.8])
    mags.grow(1.0, reset=True)
    assert mags.m.tolist() == [1.0, 1.0, 1.0] and mags.k.tolist() == [0.0, 0.0, 0.0]


def test_new_direction_starts_at_zero_update_with_kaiming_a():
    base = nn.Linear(100, 8)
    layer = SDLoRALinear(base, Magnitudes())
    layer.add_direction(10, generator=torch.Generator().manual_seed(1))
    assert layer.b_cur.abs().sum() == 0
    bound = 1 / 100 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in = 100
    assert layer.a_cur.abs().max() <= bound and layer.a_cur.abs().max() > 0.9 * bound


def test_reshape_for_roundtrips_state():
    base = nn.Linear(9, 7)
    mags = Magnitudes()
    layer = SDLoRALinear(base, mags)
    for r in (3, 2):
        layer.freeze_current()
        layer.add_direction(r)
        with torch.no_grad():
            layer.b_cur.normal_()
    sd = layer.state_dict()
    other = SDLoRALinear(nn.Linear(9, 7), Magnitudes())
    other.reshape_for([3], 2)
    other.load_state_dict(sd)
    assert other.frozen_ranks.tolist() == [3] and other.col_task.tolist() == [0, 0, 0]
    torch.testing.assert_close(other.b_cur, layer.b_cur)


def test_lora_update_terms_feed_forward_merge_and_delta():
    """LoRALinear (sequential LoRA): forward, merged forward, merged_weight and delta_weight all equal
    W x + b + s B A x."""
    from sdlora_ds.model.baselines import LoRALinear
    torch.manual_seed(1)
    base = nn.Linear(9, 7)
    layer = LoRALinear(base, scaling=0.5)
    assert torch.equal(layer.delta_weight(), torch.zeros(7, 9))  # no LoRA yet: no update
    layer.init_factors(3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(2, 5, 9)
    delta = 0.5 * layer.lora_b.detach() @ layer.lora_a.detach()
    want = x @ (base.weight + delta).T + base.bias
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), delta, **tol)
    torch.testing.assert_close(layer(x), want, **tol)
    with layer.merged():
        torch.testing.assert_close(layer(x), want, **tol)
    torch.testing.assert_close(layer.merged_weight(), base.weight + layer.delta_weight(), rtol=0, atol=1e-6)
