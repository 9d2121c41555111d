"""SDLoRAModel: what trains during a task, what stays bit-for-bit frozen, the growing head."""
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config_dict
from sdlora_ds.config import config_from_dict
from sdlora_ds.model import SDLoRAModel


def tiny_model(**over):
    return SDLoRAModel(config_from_dict(tiny_config_dict(**over)))


def test_adapters_on_query_and_value_of_every_block():
    m = tiny_model()
    names = sorted(n for n, mod in m.named_modules() if type(mod).__name__ == "SDLoRALinear")
    assert names == [f"backbone.layers.{i}.attention.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def test_only_current_task_magnitudes_and_head_change():
    torch.manual_seed(0)
    m = tiny_model()
    for t in range(3):
        m.start_task(t, 2)
        m.set_trainable()
        before = {k: v.clone() for k, v in m.state_dict().items()}
        opt = torch.optim.SGD(m.trainable_parameters(), lr=0.5, momentum=0.9)
        known = 2 * t
        for _ in range(3):
            x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 2, (8,))
            loss = F.cross_entropy(m(x)[:, known:], y)
            opt.zero_grad()
            loss.backward()
            for layer in m.layers:
                assert layer.a_cur.grad is not None and layer.b_cur.grad is not None
            assert m.magnitudes.m.grad is not None and m.head.weight.grad is not None
            opt.step()
        after = m.state_dict()
        trainable = {n for n, p in m.named_parameters() if p.requires_grad}
        assert all(not p.requires_grad or n in trainable for n, p in m.named_parameters())
        for k, v in after.items():
            if k.endswith(("a_cur", "b_cur")) or k.startswith(("magnitudes.m", "head.")):
                continue
            assert torch.equal(v, before[k]), f"{k} changed during task {t}"
        # the current direction and the magnitudes did train
        assert not torch.equal(after["backbone.layers.0.attention.q_proj.b_cur"],
                               before["backbone.layers.0.attention.q_proj.b_cur"])
        if t > 0:  # old head rows get no gradient from the masked loss
            assert torch.equal(after["head.weight"][:known], before["head.weight"][:known])
    n_bb = sum(p.numel() for p in m.backbone.parameters() if p.requires_grad) - sum(
        p.numel() for layer in m.layers for p in (layer.a_cur, layer.b_cur))
    assert n_bb == 0


def test_earlier_directions_frozen_and_identical_after_later_tasks():
    m = tiny_model()
    m.start_task(0, 2)
    with torch.no_grad():
        m.layers[0].b_cur.normal_()
    a0, b0 = m.layers[0].a_cur.detach().clone(), m.layers[0].b_cur.detach().clone()
    m.start_task(1, 2)
    m.start_task(2, 2)
    layer = m.layers[0]
    assert torch.equal(layer.a_frozen[:4], a0) and torch.equal(layer.b_frozen[:, :4], b0)
    assert layer.frozen_ranks.tolist() == [4, 4] and m.magnitudes.num_tasks == 3 and m.head.num_classes == 6


def test_structure_roundtrip_reproduces_outputs():
    torch.manual_seed(1)
    m = tiny_model(adapter={"rank": 4, "rank_schedule": [[0, 4], [1, 2]]})
    for t in range(3):
        m.start_task(t, 2)
        with torch.no_grad():
            for layer in m.layers:
                layer.b_cur.normal_()
    x = torch.rand(2, 3, 32, 32)
    want = m(x)
    fresh = tiny_model(adapter={"rank": 4, "rank_schedule": [[0, 4], [1, 2]]})
    fresh.restore_structure(m.structure())
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh(x), want)
    assert fresh.layers[0].frozen_ranks.tolist() == [4, 2] and fresh.layers[0].a_cur.shape[0] == 2


def test_merged_eval_matches_and_restores():
    m = tiny_model()
    m.start_task(0, 2)
    m.start_task(1, 2)
    with torch.no_grad():
        for layer in m.layers:
            layer.b_cur.normal_()
    x = torch.rand(2, 3, 32, 32)
    y = m(x)
    with m.merged_eval():
        torch.testing.assert_close(m(x), y)
    assert all(layer._merged is None for layer in m.layers)


def _grads_after_one_backward(arch: str, checkpointing: bool) -> tuple:
    """Trainable gradients of one backward at task 1 (frozen directions + current one), and how many
    bytes autograd kept for the backward."""
    bb = {"arch": arch, "patch_size": 7, "image_size": 28} if arch == "dinov2" else {}
    size = bb.get("image_size", 32)
    torch.manual_seed(0)
    m = tiny_model(backbone=bb, data={"image_size": size, "test_resize": size},
                   train={"activation_checkpointing": checkpointing})
    gen = torch.Generator().manual_seed(1)
    m.start_task(0, 2)
    m.start_task(1, 2)
    for layer in m.layers:  # B_cur starts at zero, which would leave dA_cur zero: give it a value
        layer.b_cur.data.copy_(torch.randn(layer.b_cur.shape, generator=gen))
    m.set_trainable()
    m.train()
    x, y = torch.rand(4, 3, size, size, generator=gen), torch.randint(0, 2, (4,), generator=gen)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        loss = F.cross_entropy(m(x)[:, 2:], y)
    loss.backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}, sum(kept)


@pytest.mark.parametrize("arch", ["vit", "dinov2"])
def test_activation_checkpointing_keeps_less_and_gives_the_same_gradients(arch):
    plain, kept_plain = _grads_after_one_backward(arch, False)
    ckpt, kept_ckpt = _grads_after_one_backward(arch, True)
    assert kept_ckpt < 0.6 * kept_plain  # the blocks' insides are recomputed, not kept
    assert plain.keys() == ckpt.keys() and any("a_cur" in n for n in plain) and "magnitudes.m" in plain
    for n in plain:
        assert plain[n].abs().sum() > 0, n
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-6, atol=1e-7, msg=n)
