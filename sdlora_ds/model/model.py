"""SDLoRAModel: frozen ViT + SD-LoRA projections + shared magnitudes + growing classifier.

Task lifecycle (called by the trainer, identically on every rank):
    start_task(t, n_new)  freeze task t-1's directions (norms computed once), add A_t/B_t to every
                          adapted projection, grow the magnitudes and the classifier
    ... train, evaluate ...
A checkpoint records `structure()`; `restore_structure()` reshapes a fresh model before
load_state_dict.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from ..config import RunConfig
from .backbone import build_backbone, cls_features, find_targets
from .head import GrowingClassifier
from .sdlora import Magnitudes, SDLoRALinear


class SDLoRAModel(nn.Module):
    def __init__(self, cfg: RunConfig):
        super().__init__()
        self.adapter_cfg = cfg.adapter
        self.backbone = build_backbone(cfg.backbone)  # every parameter frozen
        self.magnitudes = Magnitudes()
        self.layers: list = []  # SDLoRALinear, in backbone order (plain list: they live in the backbone)
        for _, parent, attr, linear in find_targets(self.backbone, cfg.adapter.target_modules):
            layer = SDLoRALinear(linear, self.magnitudes, norm=cfg.adapter.norm, impl=cfg.adapter.impl)
            setattr(parent, attr, layer)
            self.layers.append(layer)
        self.head = GrowingClassifier(self.backbone.config.hidden_size)
        self.task = -1
        self.task_sizes: list = []  # classes per task so far
        self.seed = cfg.seed

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
        for layer in self.layers:
            layer.freeze_current()
            layer.add_direction(self.adapter_cfg.rank_of(task), generator=gen)
        self.magnitudes.grow(self.adapter_cfg.magnitude_init, self.adapter_cfg.magnitude_reset)
        self.head.grow(n_new_classes, generator=gen)
        self.task_sizes.append(n_new_classes)
        self.task = task

    def trainable_parameters(self) -> list:
        """A_t, B_t of every projection, all magnitudes, the classifier; nothing else."""
        params = [p for layer in self.layers for p in (layer.a_cur, layer.b_cur) if p is not None]
        return params + [self.magnitudes.m, self.head.weight, self.head.bias]

    def set_trainable(self) -> None:
        """requires_grad exactly on trainable_parameters() (the backbone and old tasks stay frozen)."""
        keep = {id(p) for p in self.trainable_parameters()}
        for p in self.parameters():
            p.requires_grad_(id(p) in keep)

    # ------------------------------------------------------------------ forward
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, C_seen)
        return self.head(cls_features(self.backbone, pixel_values))

    @contextmanager
    def merged_eval(self):
        """Merge every projection's update into its weight once; forwards then cost a plain ViT."""
        with ExitStack() as stack:
            for layer in self.layers:
                stack.enter_context(layer.merged())
            yield

    # ------------------------------------------------------------------ checkpoint structure
    def structure(self) -> dict:
        return {"task": self.task, "task_sizes": list(self.task_sizes),
                "frozen_ranks": [layer.frozen_ranks.tolist() for layer in self.layers],
                "current_ranks": [None if layer.a_cur is None else layer.a_cur.shape[0] for layer in self.layers]}

    def restore_structure(self, s: dict) -> None:
        """Shape a freshly built model like the one that produced `s`; load_state_dict fills values."""
        assert len(s["frozen_ranks"]) == len(self.layers), "checkpoint made with another backbone"
        for layer, fr, cr in zip(self.layers, s["frozen_ranks"], s["current_ranks"]):
            layer.reshape_for(fr, cr)
        self.magnitudes.resize(len(s["task_sizes"]))
        self.head.resize(sum(s["task_sizes"]))
        self.task, self.task_sizes = s["task"], list(s["task_sizes"])

    def adapter_state_dict(self) -> dict:
        """Everything but the frozen backbone weights (which the pretrained file already holds)."""
        backbone_keys = {f"backbone.{k}" for k, _ in self.backbone.named_parameters()}
        return {k: v for k, v in self.state_dict().items() if k not in backbone_keys}
