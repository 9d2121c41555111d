"""What every class-incremental model of this project shares (SD-LoRA and the baselines).

    frozen ViT / DINOv2 backbone -> final-LayerNorm CLS token -> GrowingClassifier (rows in class order)

The trainer drives every model through the same lifecycle and never asks which method it is:
    start_task(t, n_new)   grow the adapters and the classifier for task t
    set_trainable()        requires_grad exactly on trainable_parameters()
    forward / merged_eval  training forward / evaluation with every update merged into the weights;
                           forward(x, loss_terms=True) also returns the method's extra loss terms
                           (`loss_terms()`, e.g. a regulariser), which the trainer adds and logs
    observes / observe / observed   passes over the task's train data at 'task_start' (after
                           start_task, before the first step) and 'task_end' (after the last step,
                           before evaluation): e.g. NCM's class means, a subspace of input features
    structure() + adapter_state_dict()  what a checkpoint or the final model file needs;
                           restore_structure() shapes a fresh model before load_state_dict
    events                 dicts the trainer writes to results.json and TensorBoard (e.g. KD merges)
A subclass implements `_start_adapters`, `trainable_parameters` and, when its adapters change
shape over tasks, `_structure` / `_restore_structure`. Adapted projections are listed in
`layers` (modules with `merged()`, `merged_weight()` and the frozen nn.Linear's `weight`/`bias`
names), with their qualified backbone names in `layer_names` (export writes merged weights there).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable

import torch
from torch import nn

from ..config import RunConfig
from .backbone import build_backbone, cls_features, find_targets
from .head import GrowingClassifier


class IncrementalViT(nn.Module):
    method = ""  # the config's `method` this class implements
    trains = True  # False: no optimizer and no epochs (NCM: its 'task_start' pass is all it learns)
    observes: tuple = ()  # phases ('task_start', 'task_end') at which the trainer runs observe/observed

    def __init__(self, cfg: RunConfig):
        super().__init__()
        self.adapter_cfg = cfg.adapter
        self.backbone = build_backbone(cfg.backbone, image_size=cfg.data.image_size)  # every parameter frozen
        if cfg.train.activation_checkpointing:
            # Per block (transformers' GradientCheckpointingLayer), non-reentrant: the adapters' and
            # magnitudes' gradients need no input that requires grad. determinism_check off: under
            # ZeRO-3 a frozen weight that autograd saved is partitioned again (shape [0]) by the time the
            # recompute finishes, which torch's shape check rejects (DeepSpeed PRs #8130/#8148), while
            # DeepSpeed gathers it again before the module's backward reads it; a ZeRO-3 run with
            # checkpointing agrees with one process (tests/test_distributed.py).
            self.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={
                "use_reentrant": False, "determinism_check": "none"})
        # Keys of the pretrained weights, taken before any projection is wrapped (wrapped layers keep
        # the `weight`/`bias` names). Everything else in the state dict is ours and goes into
        # adapter_state_dict; the adapters' own parameters (a_cur, lora_a, ...) live inside the
        # backbone too, so "not a backbone parameter" would wrongly drop them.
        self._pretrained_keys = frozenset(f"backbone.{k}" for k in self.backbone.state_dict())
        self.head = GrowingClassifier(self.backbone.config.hidden_size)
        self.layers: list = []  # adapted projections in backbone order (plain list: they live in the backbone)
        self.layer_names: list = []  # their qualified names inside the backbone, e.g. 'layers.3.attention.q_proj'
        self.task = -1
        self.task_sizes: list = []  # classes per task so far
        self.events: list = []  # dicts the trainer writes to results.json and TensorBoard (e.g. KD merges)
        self.seed = cfg.seed

    def _wrap_targets(self, make_layer: Callable[[nn.Linear], nn.Module]) -> None:
        """Replace every adapted projection (backbone.find_targets) by make_layer(linear), in place."""
        for name, parent, attr, linear in find_targets(self.backbone, self.adapter_cfg.target_modules):
            layer = make_layer(linear)
            setattr(parent, attr, layer)
            self.layers.append(layer)
            self.layer_names.append(name)

    # ------------------------------------------------------------------ tasks
    @property
    def known_classes(self) -> int:
        """Classes of the tasks before the current one (the masked loss starts here)."""
        return sum(self.task_sizes[:-1])

    def _generator(self, task: int) -> torch.Generator:
        # Same factors on every rank and after a resume, whatever RNG calls happened before.
        return torch.Generator().manual_seed(self.seed * 1000 + task)

    def start_task(self, task: int, n_new_classes: int) -> None:
        assert task == self.task + 1, f"tasks run in order: at {self.task}, asked for {task}"
        gen = self._generator(task)
        self._start_adapters(task, gen)  # draws from gen first, the new head rows after (fixed order)
        self.head.grow(n_new_classes, generator=gen)
        self.task_sizes.append(n_new_classes)
        self.task = task

    def _start_adapters(self, task: int, gen: torch.Generator) -> None:
        raise NotImplementedError

    def trainable_parameters(self) -> list:
        raise NotImplementedError

    def set_trainable(self) -> None:
        """requires_grad exactly on trainable_parameters() (the backbone and old tasks stay frozen)."""
        keep = {id(p) for p in self.trainable_parameters()}
        for p in self.parameters():
            p.requires_grad_(id(p) in keep)

    # ------------------------------------------------------------------ forward
    def forward(self, pixel_values: torch.Tensor, loss_terms: bool = False):
        """(B, 3, S, S) -> logits (B, C_seen); with loss_terms: (logits, {name: scalar tensor}), the
        trainer's training forward (trainer.forward_backward adds the terms to the loss)."""
        logits = self.logits(pixel_values)
        return (logits, self.loss_terms()) if loss_terms else logits

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, C_seen)
        return self.head(cls_features(self.backbone, pixel_values))

    def loss_terms(self) -> dict:
        """Extra loss terms of the micro-batch just forwarded, by name (logged as train/<name>): each a
        scalar tensor, either a mean over the micro-batch's samples or a per-step quantity such as a
        penalty on parameters. The trainer weights each by the micro-batch's share of the step's
        samples on this rank, so a per-step penalty enters every optimizer step exactly once whatever
        the accumulation, and DDP/DeepSpeed average it over ranks like the cross-entropy. Called inside
        forward: a term that reads parameters of a submodule must be computed in that submodule's
        forward (ZeRO-3 gathers a module's parameters only around its own forward and backward) and
        collected here. None by default."""
        return {}

    # ------------------------------------------------------------------ passes over a task's data
    def observe(self, phase: str, t: int, pixel_values: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor) -> None:
        """One batch of task t's train images (test transform; every image once across ranks), under
        no_grad, at `phase` in `observes`. rows: (B,) each sample's class among task t's (head row -
        known classes); keep: (B,) False for the padding samples that keep batch counts equal across
        ranks (they must not count)."""
        raise NotImplementedError(f"{type(self).__name__} lists {self.observes} in `observes` but has no observe()")

    def observed(self, phase: str, t: int, reduce: Callable[[torch.Tensor], torch.Tensor]) -> str:
        """The pass is over: reduce(tensor) sums a tensor over ranks (every rank calls it, same
        shapes, same order), so every rank reaches the same state. Returns a line for the log ('' for
        none)."""
        raise NotImplementedError(f"{type(self).__name__} lists {self.observes} in `observes` but has no observed()")

    def export_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the exported plain classifier (a linear head on the CLS token) computes; export checks
        it. Equal to forward for every trained model (NCM: see baselines.NCMModel)."""
        return self(pixel_values)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, d)
        """The CLS token after the final norm (what the head reads; the diagnostics' probe)."""
        return cls_features(self.backbone, pixel_values)

    @contextmanager
    def merged_eval(self):
        """Merge every projection's update into its weight once; forwards then cost a plain ViT."""
        with ExitStack() as stack:
            for layer in self.layers:
                stack.enter_context(layer.merged())
            yield

    # ------------------------------------------------------------------ checkpoint structure
    def structure(self) -> dict:
        return {"method": self.method, "task": self.task, "task_sizes": list(self.task_sizes), **self._structure()}

    def _structure(self) -> dict:
        return {}

    def restore_structure(self, s: dict) -> None:
        """Shape a freshly built model like the one that produced `s`; load_state_dict fills values."""
        if s.get("method", self.method) != self.method:
            raise ValueError(f"config field 'method': the model was saved by method {s['method']!r}, "
                             f"this run builds {self.method!r}")
        self._restore_structure(s)
        self.head.resize(sum(s["task_sizes"]))
        self.task, self.task_sizes = s["task"], list(s["task_sizes"])

    def _restore_structure(self, s: dict) -> None:
        pass

    def adapter_state_dict(self) -> dict:
        """Everything but the pretrained backbone weights (which the pretrained file already holds):
        frozen and current directions, magnitudes, classifier. Load with strict=False; the missing
        keys are exactly `pretrained_keys`."""
        return {k: v for k, v in self.state_dict().items() if k not in self._pretrained_keys}

    @property
    def pretrained_keys(self) -> frozenset:
        return self._pretrained_keys
