"""Memory plan of a run, per GPU, before it starts: `launch/train.py --config C --plan
[--num_processes N] [--gpu-mem GiB] [--zero-stage S] [--offload]`.

Nothing is loaded: the backbone is built on the meta device from the config's shape fields (or from
a transformers folder's config.json when it is on disk and the config does not declare its shapes:
backbone.check_shapes), the adapters are counted at the LAST task (the most frozen directions, the
whole classifier), and the batch split is the config's (optim.batch_plan for N processes).

Model states, per GPU (16-bit training under DeepSpeed; every number a byte count):
  frozen parameters  the backbone. ZeRO-3: DeepSpeed's estimate_zero3_model_states_mem_needs for
                     params nobody trains (cpu_offload=True: no optimizer state on the GPU) gives
                     2 B/param / N, plus 4 B x the largest layer for the gathered working set, plus
                     the prefetch bucket of the DeepSpeed file or, on several GPUs with a bucket,
                     twice the partitioned backbone (it stays gathered from forward to backward:
                     measured, see model_state_bytes); --offload (offload_param): the working set
                     only. ZeRO-0/1/2: every rank holds them whole (ZeRO-2: the 2 B/param of
                     estimate_zero2_model_states_mem_needs with cpu_offload=True; no DeepSpeed: fp32
                     under autocast, 4 B/param). Tensors DeepSpeed keeps whole under ZeRO-3
                     (below stage3_param_persistence_threshold) are counted whole.
  frozen directions  earlier tasks' A/B factors: buffers, so every rank holds them whole.
  adapters, gradients, optimizer states  the trainable parameters T (current A/B, magnitudes, classifier):
                     DeepSpeed's estimators with cpu_offload=False: ZeRO-2 2T + 18T/N, ZeRO-3 18T/N,
                     split as their own comment does (16-bit params 2, 16- and 32-bit grads 2 + 4, fp32
                     master + two Adam moments 4 + 8; our SGD keeps one moment, so this is an upper
                     bound by 4 B/param). No DeepSpeed: fp32 params, grads and momentum, 12 B/param.

Activations of one micro-batch of m images, N tokens (patches + CLS + registers), width d, heads h,
MLP hidden width f, e bytes per element (2 in 16-bit, 4 in fp32). What autograd saves per block
(checked tensor by tensor with saved_tensors_hooks: tests/test_plan.py), frozen weights saving nothing:
  e m N (7 d + F)      LayerNorm inputs 2d, the adapted projections' shared input d, attention q, k, v
                       and output 4d; F = f (GELU input) or 3 f (SwiGLU: gate input, its SiLU, up)
  4 m N (h + 4)        fp32: attention log-sum-exp per head, LayerNorm mean and rstd (2 norms)
  e 2 d^2              the fused low-rank update's merged weight, one per adapted projection
  e m N 2 r            16-bit only: x A_cur^T of the current task, kept unmerged (kernels/reference.py)
The first block keeps less (its input needs no gradient: no LayerNorm input and statistics, no merged
weights). Beyond what is saved, the backward of one block holds its MLP gradients: e m N F' with F' = 2 f (GELU)
or 3 f (SwiGLU), measured as the peak over the saved tensors (tests/test_plan.py). Activation
checkpointing keeps each block's input (e m N d) and recomputes one block at a time:
L e m N d + one block + F'. Not counted: the images and logits (m x 3 x S^2 and m x C), framework
workspace (cuBLAS, NCCL buffers) and allocator fragmentation: keep a margin (--gpu-mem below the card).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Optional

import torch

from .config import RunConfig

GIB = 1024 ** 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# DeepSpeed defaults for what the launch files leave out (deepspeed/runtime/zero/config.py)
_PREFETCH_DEFAULT, _PERSIST_DEFAULT = 50_000_000, 100_000


@dataclass(frozen=True)
class Arch:
    """What the plan needs of the backbone."""
    arch: str
    hidden: int            # d
    layers: int            # L
    heads: int
    mlp_hidden: int        # f: the MLP's hidden width (SwiGLU: 2/3 of mlp_size, rounded up to 8)
    swiglu: bool
    tokens: int            # N at data.image_size
    params: int            # every backbone parameter
    largest_layer: int     # DeepSpeed's model_to_params: the most parameters one module owns
    small_params: tuple    # sizes of the parameter tensors, for ZeRO-3's persistence threshold
    source: str            # where the shapes came from


@dataclass(frozen=True)
class Setting:
    """How the run is launched: what --plan takes besides the config."""
    num_processes: int = 1
    gpu_mem_gib: float = 80.0
    zero_stage: int = 3
    offload: bool = False
    prefetch_bucket: Optional[int] = None  # ZeRO-3 stage3_prefetch_bucket_size in elements; None: the launch file's


def architecture(cfg: RunConfig) -> Arch:
    from deepspeed.runtime.zero.stage3 import model_to_params

    from .model.backbone import ARCHS, _new_model, dinov2_config, vit_config
    b = cfg.backbone
    folder_cfg = None if b.path is None else os.path.join(b.path, "config.json")
    model_type = None
    if b.source == "pretrained" and not b.check_shapes and folder_cfg and os.path.isfile(folder_cfg):
        with open(folder_cfg) as f:
            model_type = json.load(f).get("model_type")  # (another model type: the loader will refuse it)
    if model_type in ARCHS:
        config, arch, source = ARCHS[model_type][0].from_pretrained(b.path), model_type, folder_cfg
    else:
        arch = b.arch or "vit"
        config = vit_config(b) if arch == "vit" else dinov2_config(b, arch)
        source = ("the config's declared shapes (checked when the weights load)" if b.check_shapes or b.source == "config"
                  else "the config's shape fields (NOT checked against the weights: set backbone.check_shapes)")
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = _new_model(arch, config)
    params = list(model.parameters())
    c, patch = model.config, model.config.patch_size
    f = c.intermediate_size if arch == "vit" else int(c.hidden_size * c.mlp_ratio)
    swiglu = bool(getattr(c, "use_swiglu_ffn", False))
    if swiglu:
        f = (int(f * 2 / 3) + 7) // 8 * 8  # transformers' Dinov2SwiGLUFFN
    tokens = (cfg.data.image_size // patch) ** 2 + 1 + getattr(c, "num_register_tokens", 0)
    return Arch(arch, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, f, swiglu, tokens,
                sum(p.numel() for p in params), model_to_params(model)[1], tuple(p.numel() for p in params), source)


# Methods whose adapters the plan counts exactly; any other is counted as SD-LoRA (a new rank-r LoRA
# per adapted projection and task, earlier ones frozen), which the plan's output says.
EXACT_METHODS = ("sdlora", "seq_lora", "linear_probe", "ncm")


def adapter_counts(cfg: RunConfig, a: Arch) -> tuple:
    """(trainable parameters, frozen direction elements) at the last task."""
    projections, d, t = 2 * a.layers, a.hidden, cfg.cil.num_tasks
    head = (d + 1) * cfg.cil.num_classes
    if cfg.method not in EXACT_METHODS or cfg.method == "sdlora":
        ranks = [cfg.adapter.rank_of(i) for i in range(t)]
        return projections * 2 * d * ranks[-1] + t + head, projections * 2 * d * sum(ranks[:-1])
    if cfg.method == "seq_lora":
        return projections * 2 * d * cfg.adapter.rank + head, 0
    return (head if cfg.method == "linear_probe" else 0), 0


def element_bytes(cfg: RunConfig) -> int:
    """'auto' is what the GPU launch files of launch/ set: bf16."""
    return 4 if cfg.dist.mixed_precision == "no" else 2


def activation_bytes(cfg: RunConfig, a: Arch, micro: int) -> dict:
    """Bytes of one micro-batch's activations (the formula of the module docstring)."""
    e, m, n, d = element_bytes(cfg), micro, a.tokens, a.hidden
    mlp_saved = 3 * a.mlp_hidden if a.swiglu else a.mlp_hidden
    mlp_backward = 3 * a.mlp_hidden if a.swiglu else 2 * a.mlp_hidden
    # 16-bit: each adapted projection keeps x A^T of its trainable LoRA term unmerged (both methods' layers)
    rank = cfg.adapter.rank_of(cfg.cil.num_tasks - 1)  # adapter.rank unless SD-LoRA-RR's schedule
    unmerged = 2 * rank if e == 2 and cfg.method not in ("linear_probe", "ncm") else 0
    block = e * m * n * (7 * d + mlp_saved + unmerged) + 4 * m * n * (a.heads + 4) + e * 2 * d * d
    transient = e * m * n * mlp_backward
    if cfg.method in ("ncm", "linear_probe"):  # nothing in the backbone needs a gradient: autograd keeps
        return {"per_block": 0, "kept": 0, "transient": block, "total": block}  # nothing; a block's working set
    # The first block's input needs no gradient (frozen embeddings): its LayerNorm keeps nothing and
    # its adapted projections keep no merged weight (only the backward to x reads it).
    first = e * m * n * d + 4 * m * n * 2 + e * 2 * d * d
    kept = a.layers * e * m * n * d + block if cfg.train.activation_checkpointing else a.layers * block - first
    return {"per_block": block, "kept": kept, "transient": transient, "total": kept + transient}


def _ds_file_value(stage: int, offload: bool, key: str, default: int) -> int:
    name = "ds_zero3_offload.json" if offload else f"ds_zero{stage}.json"
    path = os.path.join(ROOT, "launch", name)
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        value = json.load(f).get("zero_optimization", {}).get(key, default)
    return default if value == "auto" else int(value)


def model_state_bytes(cfg: RunConfig, a: Arch, s: Setting) -> dict:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as z3
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as z2
    n, e = s.num_processes, element_bytes(cfg)
    trainable, directions = adapter_counts(cfg, a)
    out = {"frozen directions": e * directions}
    if s.zero_stage == 3:
        persist = _ds_file_value(3, s.offload, "stage3_param_persistence_threshold", _PERSIST_DEFAULT)
        whole = sum(k for k in a.small_params if k < persist)
        _, gpu, working = z3(a.params - whole, a.largest_layer, num_gpus_per_node=n, cpu_offload=True,
                             cpu_offload_params=s.offload)
        bucket = s.prefetch_bucket
        if bucket is None:
            bucket = _ds_file_value(3, s.offload, "stage3_prefetch_bucket_size", _PREFETCH_DEFAULT)
        prefetch = 2 * bucket
        # With a prefetch bucket, what the forward gathers stays gathered until its backward, whatever the
        # reuse distance: up to the whole partitioned backbone (measured on 2 CPU processes: 1,152 of
        # ViT-L's 1,161 MiB, 189 of ViT-B's 329; bench/zero_memory_full.py), and the all-gathers' flat
        # buffers grow with it: counted as the backbone twice, an upper bound (ViT-L x4: 0.67 of it
        # measured). Bucket 0 + reuse distance 0 gather one module at a time. One process gathers nothing.
        retained = 2 * e * (a.params - whole) if prefetch and n > 1 else 0
        out["frozen parameters"] = (gpu - working) * e // 2 + e * whole
        out["gathered layers + prefetch"] = working + max(prefetch, retained)
        _, states, _ = z3(trainable, 0, num_gpus_per_node=n, cpu_offload=s.offload, cpu_offload_params=s.offload)
        split = {"adapters": 2, "gradients": 6, "optimizer states": 10}  # of DeepSpeed's 18 B/param
    elif s.zero_stage in (1, 2):
        out["frozen parameters"] = z2(a.params, num_gpus_per_node=n, cpu_offload=True)[1] * e // 2
        states = z2(trainable, num_gpus_per_node=n, cpu_offload=s.offload)[1]
        split = {"adapters": 2 * n, "gradients": 6, "optimizer states": 12} if not s.offload else {"adapters": 1}
        return {**out, **_split(states, split)}
    else:  # no DeepSpeed (the 1-GPU launch): fp32 weights under autocast, DDP over processes
        out["frozen parameters"] = 4 * a.params
        return {**out, "adapters": 4 * trainable, "gradients": 4 * trainable * (2 if n > 1 else 1),
                "optimizer states": 4 * trainable}
    return {**out, **_split(states, split if not s.offload else {"adapters": 1})}


def _split(total: int, weights: dict) -> dict:
    """DeepSpeed's total for the trainable parameters, divided as its multipliers are."""
    parts = {k: total * w // sum(weights.values()) for k, w in weights.items()}
    parts[next(iter(parts))] += total - sum(parts.values())
    return {"adapters": 0, "gradients": 0, "optimizer states": 0, **parts}


@dataclass
class Plan:
    cfg: RunConfig
    setting: Setting
    arch: Arch
    micro: int
    accum: int
    rows: dict        # name -> bytes per GPU
    activations: dict

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.setting.gpu_mem_gib * GIB


def make_plan(cfg: RunConfig, setting: Setting, micro: Optional[int] = None) -> Plan:
    """micro: the micro-batch to plan for (default: the config's split for setting.num_processes)."""
    if micro is None:
        micro, accum = cfg.optim.batch_plan(setting.num_processes)
    else:
        accum = cfg.optim.global_batch // (micro * setting.num_processes)
    a = architecture(cfg)
    acts = activation_bytes(cfg, a, micro)
    rows = {**model_state_bytes(cfg, a, setting), "activations": acts["total"]}
    return Plan(cfg, setting, a, micro, accum, rows, acts)


def what_fits(plan: Plan) -> list:
    """Changes, cumulative and in this order, until the plan fits: activation checkpointing, ZeRO-3,
    a smaller micro-batch with more accumulation, parameter and optimizer offload. [] if it fits."""
    if plan.fits:
        return []
    cfg, s, micro, steps = plan.cfg, plan.setting, plan.micro, []
    n, g = s.num_processes, cfg.optim.global_batch
    if not cfg.train.activation_checkpointing:
        cfg = replace(cfg, train=replace(cfg.train, activation_checkpointing=True))
        steps.append("--set train.activation_checkpointing=true")
        if make_plan(cfg, s, micro).fits:
            return steps
    if s.zero_stage != 3:
        s = replace(s, zero_stage=3)
        steps.append("ZeRO-3: launch/accelerate_zero3.yaml")
        if make_plan(cfg, s, micro).fits:
            return steps
    for m in range(micro - 1, 0, -1):
        if g % (m * n) == 0 and make_plan(cfg, s, m).fits:
            return steps + [f"--set optim.micro_batch={m} (grad_accum {g // (m * n)})"]
    s = replace(s, offload=True)
    smallest = min(m for m in range(1, micro + 1) if g % (m * n) == 0)
    steps += [f"--set optim.micro_batch={smallest}", "offload parameters and optimizer to CPU: "
              "launch/accelerate_zero3_offload.yaml"]
    fits = make_plan(cfg, s, smallest).fits
    return steps if fits else steps + ["(still does not fit: more GPUs or a smaller image size)"]


def _fmt(n: int) -> str:
    return f"{n / GIB:8.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:8.1f} MiB"


def format_plan(plan: Plan) -> str:
    a, s, cfg = plan.arch, plan.setting, plan.cfg
    mode = {0: "no DeepSpeed (DDP)", 1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3"}[s.zero_stage] + \
        (" + CPU offload" if s.offload else "")
    prec = {2: "16-bit", 4: "fp32"}[element_bytes(cfg)]
    lines = [f"memory plan for {cfg.name!r} (the plan's arithmetic, not a measurement)",
             f"  backbone: {a.arch}, {a.layers} blocks x width {a.hidden}, {a.heads} heads, MLP {a.mlp_hidden}"
             f"{' SwiGLU' if a.swiglu else ''}, {a.params / 1e6:.1f}M parameters; shapes from {a.source}",
             f"  {s.num_processes} GPU(s) x {s.gpu_mem_gib:g} GiB, {mode}, {prec}; {a.tokens} tokens at "
             f"{cfg.data.image_size} px; micro-batch {plan.micro} x grad_accum {plan.accum}; activation "
             f"checkpointing {'on' if cfg.train.activation_checkpointing else 'off'}",
             "  per GPU:"]
    if cfg.method not in EXACT_METHODS:
        lines.insert(-1, f"  adapters of method {cfg.method!r} counted as SD-LoRA's (a rank-{cfg.adapter.rank} LoRA per "
                         "adapted projection and task): an estimate")
    lines += [f"    {name:<28}{_fmt(v)}" for name, v in plan.rows.items()]
    ac = plan.activations
    lines.append(f"      (activations: {_fmt(ac['per_block']).strip()} per block, "
                 f"{_fmt(ac['kept']).strip()} kept in all, {_fmt(ac['transient']).strip()} backward working set)")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"    {'total':<28}{_fmt(plan.total)}  of {s.gpu_mem_gib:g} GiB: {verdict}")
    for step in what_fits(plan):
        lines.append(f"  to fit: {step}")
    return "\n".join(lines)
