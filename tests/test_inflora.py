"""InfLoRA (sdlora_ds/methods/inflora.py): A designed from the task's input features outside the
stored subspace, against a hand computation (numpy) on a tiny model; the memory update with its
threshold; updates orthogonal to the stored subspace through training (A fixed bitwise); export;
in the trainer: resume bitwise (in process), and slow: 1 process vs 2 (gloo) vs ZeRO-2 vs ZeRO-3."""
import os

import numpy as np
import pytest
import torch

from conftest import tiny_config_dict
from sdlora_ds.config import ConfigError, config_from_dict, config_to_dict, load_config
from sdlora_ds.methods.inflora import A_SCALE, InfLoRAModel
from test_olora import (launch_all, resumed_after_kills_equal, resumed_runs_equal,  # noqa: F401 (shards: the fixture)
                        shards)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def inflora_cfg(**over):
    return config_from_dict(tiny_config_dict(method="inflora", adapter={"rank": 3}, **over))


def record_inputs(model):
    """Forward pre-hooks: every adapted projection's inputs (B, N, d) as float64 numpy arrays."""
    seen = {i: [] for i in range(len(model.layers))}
    hooks = [layer.register_forward_pre_hook(lambda m, args, i=i: seen[i].append(args[0].detach().double().numpy()))
             for i, layer in enumerate(model.layers)]
    return seen, hooks


def run_pass(model, phase, t, images, keep):
    """The trainer's pass (Trainer.observe_task) on one process: batches of 4, sums reduced by identity."""
    model.eval()
    rows = torch.zeros(len(images), dtype=torch.long)
    with torch.no_grad():
        for i in range(0, len(images), 4):
            model.observe(phase, t, images[i:i + 4], rows[i:i + 4], keep[i:i + 4])
    note = model.observed(phase, t, lambda x: x)
    model.train()
    return note


def hand_cov(inputs, keep):
    """sum over kept samples' tokens of x x^T, from the recorded inputs."""
    x = np.concatenate(inputs)[keep.numpy()]  # (B_kept, N, d)
    x = x.reshape(-1, x.shape[-1])
    return x.T @ x


def test_options_and_the_shipped_config():
    cfg = inflora_cfg(method_options={"threshold_first": 0.9})
    assert (cfg.options.threshold_first, cfg.options.threshold_last) == (0.9, 0.99)
    assert config_to_dict(cfg)["method_options"] == {"threshold_first": 0.9, "threshold_last": 0.99}
    for bad, field in [({"threshold_first": 0}, "threshold_first"), ({"threshold_last": 1.5}, "threshold_last"),
                       ({"threshold_first": 0.99, "threshold_last": 0.9}, "threshold_last")]:
        with pytest.raises(ConfigError, match=f"'method_options.{field}'"):
            config_from_dict(tiny_config_dict(method="inflora", method_options=bad))
    shipped = load_config(os.path.join(ROOT, "configs", "demo_animals_inflora.json"))
    assert shipped.method == "inflora" and shipped.options.threshold_first == 0.95
    m = InfLoRAModel(cfg)  # 5 tasks: eps_t linear from 0.9 at task 0 to 0.99 at task 4
    assert [round(m.threshold(t), 6) for t in range(5)] == [0.9, 0.9225, 0.945, 0.9675, 0.99]


def test_design_and_memory_against_a_hand_computation():
    torch.manual_seed(0)
    model = InfLoRAModel(inflora_cfg())
    model.start_task(0, 2)
    images = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    keep = torch.tensor([True] * 9 + [False])  # the last one is padding: it must not count
    seen, hooks = record_inputs(model)
    run_pass(model, "task_start", 0, images, keep)
    for h in hooks:
        h.remove()
    for i, layer in enumerate(model.layers):
        cov = hand_cov(seen[i], keep)
        vals, vecs = np.linalg.eigh(cov)
        top = vecs[:, ::-1][:, :3]  # (d, r): the 3 largest
        a = layer.lora_a.double().numpy()
        np.testing.assert_allclose(np.linalg.norm(a, axis=1), A_SCALE, rtol=1e-6)
        # the same rows up to sign: the projectors agree
        np.testing.assert_allclose(a.T @ a / A_SCALE ** 2, top @ top.T, atol=1e-5)
        assert not isinstance(layer.lora_a, torch.nn.Parameter)  # fixed: only B trains
    assert all(layer.memory.shape[1] == 0 for layer in model.layers)

    seen, hooks = record_inputs(model)
    run_pass(model, "task_end", 0, images, keep)
    for h in hooks:
        h.remove()
    eps = model.threshold(0)
    for i, layer in enumerate(model.layers):
        vals, vecs = np.linalg.eigh(hand_cov(seen[i], keep))
        vals, vecs = vals[::-1], vecs[:, ::-1]
        share = np.cumsum(vals) / vals.sum()
        r = int(np.argmax(share >= eps)) + 1  # the fewest leading directions explaining >= eps of the energy
        m = layer.memory.double().numpy()
        assert m.shape[1] == r and 0 < r < m.shape[0]
        np.testing.assert_allclose(m @ m.T, vecs[:, :r] @ vecs[:, :r].T, atol=1e-5)
    assert model.events[-1]["kind"] == "inflora_memory" and model.events[-1]["sizes"] == model.memory_sizes()


@pytest.mark.parametrize("targets,shared,detach", [(["q_proj", "v_proj"], True, False),
                                                   (["q_proj", "v_proj"], True, True),
                                                   (["q_proj", "o_proj"], False, False)])
def test_one_covariance_per_shared_input_and_the_same_design_and_memory(targets, shared, detach):
    """q and v read the same tensor: one C per block, reduced once, and the designed A and the memory
    bitwise what a C recorded by each projection on its own gives; also when each projection gets its
    own detach() of the input, as ZeRO-3's forward pre-hook hands it; o_proj reads another input: no
    sharing."""
    import copy
    torch.manual_seed(0)
    raw = tiny_config_dict(method="inflora", adapter={"rank": 3, "target_modules": targets})
    model = InfLoRAModel(config_from_dict(raw))
    images = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    keep = torch.tensor([True] * 9 + [False])
    rows = torch.zeros(10, dtype=torch.long)
    for t, phase in [(0, "task_start"), (0, "task_end")]:
        if phase == "task_start":
            model.start_task(0, 2)
        own = {i: torch.zeros(32, 32, dtype=torch.float64) for i in range(len(model.layers))}

        def record(m, args, i):  # the per-projection recording, as before the sharing
            xs = args[0][m._keep].reshape(-1, 32).double()
            own[i] += xs.t() @ xs
        hooks = [layer.register_forward_pre_hook(lambda m, args, i=i: record(m, args, i))
                 for i, layer in enumerate(model.layers)]
        if detach:  # what DeepSpeed ZeRO-3 does to every module's inputs: a new tensor object per module
            hooks += [layer.register_forward_pre_hook(lambda m, args: (args[0].detach(),) + args[1:])
                      for layer in model.layers]
        model.eval()
        with torch.no_grad():
            for i in range(0, 10, 4):
                model.observe(phase, t, images[i:i + 4], rows[i:i + 4], keep[i:i + 4])
        for h in hooks:
            h.remove()
        recorded = [layer._cov is not None for layer in model.layers]
        assert recorded == ([True, False] * 2 if shared else [True] * 4)
        twin = copy.deepcopy(model)  # each projection designed / updated from its own C
        for i, layer in enumerate(twin.layers):
            layer.design_a(own[i]) if phase == "task_start" else layer.update_memory(own[i], model.threshold(0))
        sizes = []
        note = model.observed(phase, t, lambda x: sizes.append(x.numel()) or x)
        assert sizes == [(2 if shared else 4) * 32 * 32]  # one collective, one C per distinct input
        assert f"{2 if shared else 4} input covariances for 4 projections" in note
        for a, b in zip(model.layers, twin.layers):
            assert torch.equal(a.lora_a, b.lora_a) and torch.equal(a.memory, b.memory), phase
            assert a._same_as is None and a._cov is None and a._last is None  # nothing left over
    assert all(layer.memory.shape[1] > 0 for layer in model.layers)
    if shared:  # q and v of a block: the same C, so the same A and memory
        for q, v in zip(model.layers[::2], model.layers[1::2]):
            assert torch.equal(q.lora_a, v.lora_a) and torch.equal(q.memory, v.memory)


def test_updates_stay_orthogonal_to_the_stored_subspace():
    torch.manual_seed(0)
    model = InfLoRAModel(inflora_cfg(method_options={"threshold_first": 0.8, "threshold_last": 0.9}))
    gen = torch.Generator().manual_seed(1)
    keep = torch.ones(8, dtype=torch.bool)
    model.start_task(0, 2)
    run_pass(model, "task_start", 0, torch.rand(8, 3, 32, 32, generator=gen), keep)
    with torch.no_grad():
        for layer in model.layers:
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=gen))
    run_pass(model, "task_end", 0, torch.rand(8, 3, 32, 32, generator=gen), keep)
    m0 = [layer.memory.clone() for layer in model.layers]
    model.start_task(1, 2)
    run_pass(model, "task_start", 1, torch.rand(8, 3, 32, 32, generator=gen) ** 2, keep)
    a1 = [layer.lora_a.clone() for layer in model.layers]
    for layer, m in zip(model.layers, m0):
        assert torch.linalg.norm(layer.lora_a.double() @ m.double()) < 1e-5 * torch.linalg.norm(layer.lora_a.double())
    model.set_trainable()
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5, momentum=0.9)
    x, y = torch.rand(6, 3, 32, 32, generator=gen), torch.tensor([0, 1, 0, 1, 1, 0])
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x)[:, 2:], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for layer, m, a in zip(model.layers, m0, a1):
        assert torch.equal(layer.lora_a, a)  # A fixed bitwise
        delta = layer.lora_b.detach().double() @ layer.lora_a.double()  # B_1 A_1: task 1's whole update
        assert torch.linalg.norm(delta) > 0  # it trained (B started at 0)
        assert torch.linalg.norm(delta @ m.double()) < 1e-5 * torch.linalg.norm(delta)  # no effect on span(M_0)
        # and in the layer's merged weight: W + B_0 A_0 + B_1 A_1 acts on span(M_0) as W + B_0 A_0 does
        frozen_only = layer.weight.double() + layer.b_frozen.double() @ layer.a_frozen.double()
        torch.testing.assert_close(layer.merged_weight().double() @ m.double(), frozen_only @ m.double(),
                                   atol=1e-5, rtol=0)
    run_pass(model, "task_end", 1, torch.rand(8, 3, 32, 32, generator=gen), keep)
    for layer, m in zip(model.layers, m0):
        grown = layer.memory.double()
        assert torch.equal(layer.memory[:, :m.shape[1]], m) and grown.shape[1] >= m.shape[1]
        torch.testing.assert_close(grown.t() @ grown, torch.eye(grown.shape[1], dtype=torch.float64), atol=1e-5, rtol=0)


def test_export_with_the_logit_check_and_the_final_model_file(tmp_path):
    from sdlora_ds.export import FINAL_MODEL, export_model, load_final_model, save_final_model
    from sdlora_ds.fileio import atomic_write_json
    torch.manual_seed(0)
    cfg = inflora_cfg()
    model = InfLoRAModel(cfg)
    gen = torch.Generator().manual_seed(3)
    for t in range(2):
        model.start_task(t, 2)
        run_pass(model, "task_start", t, torch.rand(4, 3, 32, 32, generator=gen), torch.ones(4, dtype=torch.bool))
        with torch.no_grad():
            for layer in model.layers:
                layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=gen))
        run_pass(model, "task_end", t, torch.rand(4, 3, 32, 32, generator=gen), torch.ones(4, dtype=torch.bool))
    model.eval()
    x = torch.rand(3, 3, 32, 32, generator=gen)
    with torch.no_grad():
        want = model(x)
    export_model(model, [f"c{j}" for j in range(10)], cfg.data, str(tmp_path / "out"))  # raises unless logits agree
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    atomic_write_json(str(run_dir / "config.json"), config_to_dict(cfg))
    save_final_model(str(run_dir / FINAL_MODEL), model, cfg, list(range(10)), [f"c{j}" for j in range(10)])
    again, _, payload = load_final_model(str(run_dir))
    assert payload["structure"]["memory"] == model.memory_sizes()
    with torch.no_grad():
        torch.testing.assert_close(again(x), want, rtol=0, atol=0)
    assert all(torch.equal(a.memory, b.memory) for a, b in zip(again.layers, model.layers))


# ---------------------------------------------------------------------- in the trainer
def test_trainer_designs_updates_memory_and_resumes_bitwise(shards, tmp_path):
    trainer, ref = resumed_runs_equal(shards, tmp_path, "inflora",
                                      ["step-00000002", "step-00000003-task0-end", "step-00000005"])
    mem = [e for e in ref["events"] if e["kind"] == "inflora_memory"]
    assert [e["task"] for e in mem] == [0, 1] and all(k > 0 for k in mem[0]["sizes"])
    for layer, k0 in zip(trainer.model.layers, mem[0]["sizes"]):  # task 1's A: outside task 0's stored subspace
        assert torch.linalg.norm(layer.lora_a.double() @ layer.memory[:, :k0].double()) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["two", "zero2", "zero3"])
def test_killed_mid_task_and_at_a_task_end_resumes_bitwise(shards, tmp_path, topology):
    """2 gloo processes, ZeRO-2, ZeRO-3: the designed A (a buffer, outside the optimizer) and the memory
    come back from the mid-task and the task-end checkpoint; task 1's A is designed after the second
    resume from the restored memory, and the memory update at its end is the uninterrupted run's."""
    ref, _ = resumed_after_kills_equal(shards, tmp_path, "inflora", topology)
    assert [e["task"] for e in ref["events"] if e["kind"] == "inflora_memory"] == [0, 1]


@pytest.mark.slow
def test_one_process_two_processes_zero2_zero3_agree(shards, tmp_path):
    """The covariances are summed over ranks, so 2 processes (each seeing half of the task's images)
    design the same A and memory as 1, under DDP, ZeRO-2 and ZeRO-3."""
    runs = launch_all(shards, tmp_path, "inflora")
    one, state = runs["one"]
    for name in ("two", "zero2", "zero3"):
        got, got_state = runs[name]
        assert got["world_size"] == 2
        assert [e["sizes"] for e in got["events"]] == [e["sizes"] for e in one["events"]], name
        assert max(abs(x[1] - y[1]) for x, y in zip(one["loss_log"], got["loss_log"])) < 1e-5, name
        for key in (k for k in state if k.endswith(("lora_a", "memory"))):
            a, b = state[key].double(), got_state[key].double()
            # the same subspace: compare projectors (eigenvectors are defined up to sign)
            pa, pb = (a.t() @ a, b.t() @ b) if key.endswith("lora_a") else (a @ a.t(), b @ b.t())
            torch.testing.assert_close(pa, pb, atol=1e-4, rtol=0, msg=f"{name} {key}")
        for r1, r2 in zip(one["acc_matrix"], got["acc_matrix"]):
            assert r1 == pytest.approx(r2, abs=0.7), name
