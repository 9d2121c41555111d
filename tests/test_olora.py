"""O-LoRA (sdlora_ds/methods/olora.py): the orthogonality penalty and its gradient by hand on a tiny
model, earlier LoRAs bitwise frozen through training, the update s sum_i B_i A_i, export with its
logit check, the config; in the trainer: resume bitwise (in process), and slow: 1 process vs 2 (gloo)
vs 2 under ZeRO-2 and ZeRO-3."""
import json
import os

import pytest
import torch

from conftest import tiny_config_dict
from sdlora_ds.config import ConfigError, config_from_dict, config_to_dict, load_config
from sdlora_ds.methods.olora import OLoRAModel, TaskLoRALinear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def olora_cfg(**over):
    raw = tiny_config_dict(method="olora", adapter={"rank": 2}, method_options={"orth_lambda": 0.3}, **over)
    return config_from_dict(raw)


def randomise(model, seed):
    """Give the current LoRAs non-trivial values (B = 0 at init would hide the update)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers:
            layer.lora_a.copy_(torch.randn(layer.lora_a.shape, generator=g))
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.1)


def test_config_options_and_the_shipped_config():
    cfg = olora_cfg()
    assert cfg.options.orth_lambda == 0.3 and cfg.options.scaling == 1.0
    assert config_to_dict(cfg)["method_options"] == {"orth_lambda": 0.3, "scaling": 1.0}
    for bad, field in [({"orth_lambda": -1}, "orth_lambda"), ({"scaling": 0}, "scaling"), ({"lambda": 1}, "lambda")]:
        with pytest.raises(ConfigError, match=f"'method_options.{field}'"):
            config_from_dict(tiny_config_dict(method="olora", method_options=bad))
    shipped = load_config(os.path.join(ROOT, "configs", "demo_animals_olora.json"))
    assert shipped.method == "olora" and shipped.options.orth_lambda == 0.5


def test_penalty_and_its_gradient_by_hand():
    torch.manual_seed(0)
    model = OLoRAModel(olora_cfg())
    model.start_task(0, 2)
    x = torch.rand(3, 3, 32, 32)
    model.train()
    logits, terms = model(x, loss_terms=True)
    assert terms == {}  # task 0: no earlier LoRA, no penalty
    randomise(model, 1)
    old = [layer.lora_a.detach().clone() for layer in model.layers]
    model.start_task(1, 2)
    randomise(model, 2)
    model.set_trainable()
    logits, terms = model(x, loss_terms=True)
    assert set(terms) == {"orthogonality"} and logits.shape == (3, 4)
    want, grads = 0.0, []
    for layer, a_old in zip(model.layers, old):
        a_new = layer.lora_a.detach()
        o = [[sum(float(a_old[j, k]) * float(a_new[i, k]) for k in range(a_old.shape[1]))
              for i in range(a_new.shape[0])] for j in range(a_old.shape[0])]  # A_0 A_1^T, element by element
        want += sum(abs(v) for row in o for v in row)
        # d/dA_1[i, k] of sum_{j,i} |O[j, i]| = sum_j sign(O[j, i]) A_0[j, k]
        grads.append(torch.tensor([[sum((1.0 if o[j][i] > 0 else -1.0) * float(a_old[j, k]) for j in range(len(o)))
                                    for k in range(a_new.shape[1])] for i in range(a_new.shape[0])]))
    assert terms["orthogonality"].item() == pytest.approx(0.3 * want, rel=1e-5)
    terms["orthogonality"].backward()
    for layer, g in zip(model.layers, grads):
        torch.testing.assert_close(layer.lora_a.grad, 0.3 * g, rtol=1e-5, atol=1e-6)
        assert layer.lora_b.grad is None or not layer.lora_b.grad.any()  # the penalty reads A only
    model.eval()
    assert model(x, loss_terms=True)[1] == {}  # evaluation forwards compute no penalty


def test_earlier_loras_are_frozen_bitwise_and_summed():
    torch.manual_seed(0)
    cfg = olora_cfg()
    model = OLoRAModel(cfg)
    model.start_task(0, 2)
    randomise(model, 1)
    first = [(layer.lora_a.detach().clone(), layer.lora_b.detach().clone()) for layer in model.layers]
    model.start_task(1, 2)
    model.set_trainable()
    trainable = {id(p) for p in model.trainable_parameters()}
    assert all(id(layer.lora_a) in trainable and id(layer.lora_b) in trainable for layer in model.layers)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5, momentum=0.9)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    model.train()
    for _ in range(3):
        logits, terms = model(x, loss_terms=True)
        loss = torch.nn.functional.cross_entropy(logits[:, 2:], y) + terms["orthogonality"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    for layer, (a0, b0) in zip(model.layers, first):
        assert torch.equal(layer.a_frozen, a0) and torch.equal(layer.b_frozen, b0)  # bitwise
        assert not layer.a_frozen.requires_grad and layer.frozen_ranks.tolist() == [2]
        assert layer.lora_b.detach().abs().sum() > 0  # the new LoRA did train
        # the update is s (B_0 A_0 + B_1 A_1)
        want = layer.weight + 1.0 * (b0 @ a0 + layer.lora_b.detach() @ layer.lora_a.detach())
        torch.testing.assert_close(layer.merged_weight(), want, rtol=1e-5, atol=1e-6)
    xs = torch.rand(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        unmerged = model(xs)
        with model.merged_eval():
            torch.testing.assert_close(model(xs), unmerged, rtol=1e-5, atol=1e-5)


def test_export_with_the_logit_check_and_the_final_model_file(tmp_path):
    from sdlora_ds.export import FINAL_MODEL, export_model, export_run, load_final_model, save_final_model
    from sdlora_ds.fileio import atomic_write_json
    from transformers import AutoModelForImageClassification
    torch.manual_seed(0)
    cfg = olora_cfg()
    model = OLoRAModel(cfg)
    for t in range(3):
        model.start_task(t, 2 if t < 2 else 6)
        randomise(model, t)
    model.eval()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(x)
    names = [f"c{j}" for j in range(10)]
    hf = export_model(model, names, cfg.data, str(tmp_path / "out"))  # raises unless the logits agree
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, want, rtol=1e-4, atol=1e-4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    atomic_write_json(str(run_dir / "config.json"), config_to_dict(cfg))
    save_final_model(str(run_dir / FINAL_MODEL), model, cfg, list(range(10)), names)
    again, _, payload = load_final_model(str(run_dir))
    assert payload["structure"]["lora_ranks"] == [[[2, 2], 2]] * len(model.layers)
    with torch.no_grad():
        torch.testing.assert_close(again(x), want, rtol=0, atol=0)
    export_run(str(run_dir), str(tmp_path / "out2"))
    with torch.no_grad():
        got = AutoModelForImageClassification.from_pretrained(str(tmp_path / "out2")).eval()(pixel_values=x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_task_lora_linear_without_a_current_lora_is_the_frozen_sum():
    base = torch.nn.Linear(6, 5)
    layer = TaskLoRALinear(base, scaling=0.5)
    x = torch.rand(2, 3, 6)
    torch.testing.assert_close(layer(x), base(x))
    layer.init_factors(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_b.copy_(torch.rand(5, 2))
    a, b = layer.lora_a.detach().clone(), layer.lora_b.detach().clone()
    layer.freeze_current()
    assert layer.lora_a is None and layer.ranks() == [[2], None]
    torch.testing.assert_close(layer(x), base(x) + 0.5 * x @ (b @ a).t(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- in the trainer
# (shared with tests/test_inflora.py)
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from shards.digits import write_digits_shards
    return write_digits_shards(str(tmp_path_factory.mktemp("digits") / "shards"))


def trainer_raw(shards, out, method, **over):
    """2 tasks of 5 digit classes, 3 steps of 2 x 8 samples each, a checkpoint every step."""
    raw = tiny_config_dict(index=shards, name="run", output_dir=str(out), method=method, adapter={"rank": 2},
                           cil={"num_classes": 10, "init_classes": 5, "increment": 5, "num_tasks": 2},
                           data={"train_scale": [1.0, 1.0], "train_ratio": [1.0, 1.0]},
                           optim={"epochs": 1, "global_batch": 16, "micro_batch": 8, "max_steps_per_epoch": 3},
                           train={"checkpoint_every": 1, "keep_checkpoints": 100, "probe_size": 0, "eval_batch": 64})
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return raw


def comparable(res: dict) -> dict:
    """results.json without wall-clock times, launch segments and the output folder."""
    res = json.loads(json.dumps(res))
    for key in ("task_seconds", "topologies"):
        res.pop(key)
    res["config"].pop("output_dir")
    return res


def final_state(run_dir) -> dict:
    return torch.load(os.path.join(run_dir, "final_model.pt"), weights_only=True)["state"]


def resumed_runs_equal(shards, tmp_path, method, checkpoints) -> tuple:
    """The uninterrupted run (its Trainer and results), and each resume from `checkpoints` of it
    checked equal to it: results.json and final_model.pt bitwise."""
    from sdlora_ds.trainer import Trainer
    trainer = Trainer(config_from_dict(trainer_raw(shards, tmp_path / "full", method)))
    ref = trainer.run()
    state = final_state(tmp_path / "full" / "run")
    for ckpt in checkpoints:
        got = Trainer(config_from_dict(trainer_raw(shards, tmp_path / ckpt, method)),
                      resume=str(tmp_path / "full" / "run" / "checkpoints" / ckpt)).run()
        assert comparable(got) == comparable(ref), ckpt
        again = final_state(tmp_path / ckpt / "run")
        assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state), ckpt
    return trainer, ref


# accelerate launch topologies: 1 process (accumulation 2), 2 gloo processes, ZeRO-2, ZeRO-3
TOPOLOGIES = [("one", "cpu", 1), ("two", "cpu", 2), ("zero2", "cpu_zero2", 2), ("zero3", "cpu_zero3", 2)]


def launch_config(shards, tmp_path, method, name, nproc, **over) -> str:
    """The config file of the run `name` (global batch 16 on `nproc` processes, no accumulation
    beyond 1 process's 2) in tmp_path/name."""
    raw = trainer_raw(shards, tmp_path / name, method, optim={"micro_batch": 8 // nproc}, dist={"timeout_s": 120},
                      **over)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(raw))
    return str(path)


def launched(run_dir) -> tuple:
    """(results.json, final_model.pt state) of a finished launched run."""
    with open(os.path.join(run_dir, "results.json")) as f:
        return json.load(f), final_state(run_dir)


def launch_all(shards, tmp_path, method) -> dict:
    """name -> (results.json, final_model.pt state) of the method's run under each of TOPOLOGIES
    (test_distributed's launcher and logs)."""
    from test_distributed import command, run, tail
    out = {}
    for name, topology, nproc in TOPOLOGIES:
        cfg, log = launch_config(shards, tmp_path, method, name, nproc, train={"checkpoint_every": 0}), \
            str(tmp_path / f"{name}-log")
        assert run(command(topology, nproc, cfg), log, timeout=900) == 0, tail(log)
        out[name] = launched(tmp_path / name / "run")
    return out


def kill_after(cmd: list, log: str, run_dir, ckpt: str) -> None:
    """Start `cmd`, SIGKILL the job once its checkpoint `ckpt` is complete, and remove any later
    checkpoint: the run folder a kill landing right after `ckpt` leaves (on a loaded machine the run
    may have gone on a step before the kill lands; the later checkpoints' logged steps stay, as they
    do after any kill, and the resume drops them)."""
    import shutil
    import time
    from sdlora_ds.checkpoint import Checkpoints
    from test_distributed import kill_tree, start, tail

    class Main:  # Checkpoints.scan reads the rank only
        process_index, num_processes, is_main_process = 0, 1, True
    root = os.path.join(str(run_dir), "checkpoints")
    proc, end = start(cmd, log), time.time() + 900
    try:
        while ckpt not in [os.path.basename(p) for p, _ in Checkpoints(root, 100, Main()).scan()[0]]:
            assert proc.poll() is None, f"the run ended before checkpoint {ckpt}\n{tail(log)}"
            assert time.time() < end, f"no checkpoint {ckpt} within 900 s\n{tail(log)}"
            time.sleep(0.05)
    finally:
        kill_tree(proc)
    for name in os.listdir(root):
        if not name.startswith(".") and name > ckpt:  # zero-padded steps: later checkpoints sort after
            shutil.rmtree(os.path.join(root, name))


def resumed_after_kills_equal(shards, tmp_path, method, topology_name) -> tuple:
    """Under one of TOPOLOGIES: the uninterrupted run, and the same run SIGKILLed after its mid-task
    checkpoint step-00000002 (task 0), resumed with --resume auto, SIGKILLed again after task 0's end
    checkpoint, resumed again: results.json and final_model.pt bitwise the uninterrupted run's.
    Returns (results.json, final state) of the uninterrupted run."""
    from test_distributed import command, run, tail
    _, topology, nproc = next(t for t in TOPOLOGIES if t[0] == topology_name)
    ref_cfg, cfg = (launch_config(shards, tmp_path, method, name, nproc) for name in ("full", "killed"))
    log = str(tmp_path / "log")
    assert run(command(topology, nproc, ref_cfg), log + "-full", timeout=900) == 0, tail(log + "-full")
    run_dir = tmp_path / "killed" / "run"
    kill_after(command(topology, nproc, cfg), log + "-1", run_dir, "step-00000002")
    kill_after(command(topology, nproc, cfg, "--resume", "auto"), log + "-2", run_dir, "step-00000003-task0-end")
    assert run(command(topology, nproc, cfg, "--resume", "auto"), log + "-3", timeout=900) == 0, tail(log + "-3")
    for segment, ckpt in (("-2", "step-00000002"), ("-3", "step-00000003-task0-end")):
        assert f"{ckpt}: task" in open(log + segment + ".out").read(), tail(log + segment)  # resumed from it
    (ref, state), (got, again) = launched(tmp_path / "full" / "run"), launched(run_dir)
    assert [t["from_global_step"] for t in got["topologies"]] == [0, 2, 3]
    assert got["world_size"] == nproc and comparable(got) == comparable(ref), topology_name
    assert state.keys() == again.keys(), topology_name
    assert [k for k in state if not torch.equal(state[k], again[k])] == [], topology_name
    return ref, state


def test_trainer_logs_the_penalty_and_resumes_bitwise(shards, tmp_path):
    from sdlora_ds.logger import read_scalars
    resumed_runs_equal(shards, tmp_path, "olora", ["step-00000004"])
    scalars = read_scalars(str(tmp_path / "full" / "run" / "tensorboard"))
    assert [s for s, _ in scalars["train/orthogonality"]] == [4, 5, 6] and scalars["train/orthogonality"][0][1] > 0


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["two", "zero2", "zero3"])
def test_killed_mid_task_and_at_a_task_end_resumes_bitwise(shards, tmp_path, topology):
    """2 gloo processes, ZeRO-2, ZeRO-3: a frozen LoRA stacked at the task end, the penalty on the
    resumed steps, the optimizer state of the current LoRA all come back exactly."""
    resumed_after_kills_equal(shards, tmp_path, "olora", topology)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "killed" / "run" / "metrics.jsonl")
             if '"train/orthogonality"' in line]
    assert steps == [4, 5, 6]  # task 1's penalty, logged once per step across the three segments


@pytest.mark.slow
def test_one_process_two_processes_and_zero2_zero3_agree(shards, tmp_path):
    """The penalty is computed inside each projection's forward, where ZeRO-3 has A_t gathered."""
    runs = launch_all(shards, tmp_path, "olora")
    orth = {name: [json.loads(line)["value"] for line in open(tmp_path / name / "run" / "metrics.jsonl")
                   if '"train/orthogonality"' in line] for name in runs}
    one = runs["one"][0]
    assert len(orth["one"]) == 3
    for name in ("two", "zero2", "zero3"):
        got = runs[name][0]
        assert got["world_size"] == 2
        assert max(abs(x[1] - y[1]) for x, y in zip(one["loss_log"], got["loss_log"])) < 1e-5, name
        assert max(abs(x - y) for x, y in zip(orth["one"], orth[name])) < 1e-4 * max(orth["one"]), name
        for r1, r2 in zip(one["acc_matrix"], got["acc_matrix"]):
            assert r1 == pytest.approx(r2, abs=0.7), name
