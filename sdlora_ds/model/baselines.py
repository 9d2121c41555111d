"""Baselines on the same backbone, data, head, masked loss and metrics as SD-LoRA.

- 'seq_lora' (SeqLoRAModel): ONE plain LoRA per adapted projection, y = W x + b + s B A x, trained
  through every task in sequence: no decoupling into direction and magnitude, no freezing, no
  per-task factors. What SD-LoRA's design is meant to beat (its forgetting is the drift of B A).
  s = LORA_SCALING = 1.0 is SD-LoRA's initial magnitude, so at task 0 both methods start from the
  same update (A ~ kaiming_uniform(a=sqrt(5)), B = 0, same generator: identical initial factors) and
  differ only in what follows. The rank is adapter.rank.
- 'linear_probe' (LinearProbeModel): the frozen backbone and the growing classifier only.
- 'ncm' (NCMModel): no training at all. Each class is the mean of the frozen backbone's CLS features
  over its train images (test transform, no augmentation), and a test image goes to the class of
  highest cosine similarity (SimpleCIL, Zhou et al. 2023). It separates "the features are too weak"
  from "the heads or adapters drift".
- Joint training (the upper bound) is not a model: method 'sdlora' with cil.num_tasks = 1.

Both reuse the trainer's lifecycle (model/base.py); seq_lora's layer goes through the same stacked
low-rank Function as SD-LoRA's current direction (no frozen columns, a constant scale), so the two
are computed the same way, bf16 handling included.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..config import RunConfig
from ..kernels import stacked_lowrank_linear
from .base import IncrementalViT
from .sdlora import MergeableLinear

LORA_SCALING = 1.0


class LoRALinear(MergeableLinear):
    """nn.Linear + one LoRA update s B A (A: (r, d_in), B: (d_out, r)); keeps `weight`/`bias`."""

    def __init__(self, base: nn.Linear, scaling: float = LORA_SCALING, impl: str = "auto"):
        super().__init__(base)
        self.impl = impl
        w = base.weight
        self.register_buffer("scaling", torch.tensor(float(scaling), dtype=w.dtype, device=w.device))
        # No frozen columns: empty stacked factors for the shared Function (not saved).
        self.register_buffer("_no_a", w.new_zeros(0, self.in_features), persistent=False)
        self.register_buffer("_no_b", w.new_zeros(self.out_features, 0), persistent=False)
        self.register_buffer("_no_s", w.new_zeros(0), persistent=False)
        self.lora_a: Optional[nn.Parameter] = None
        self.lora_b: Optional[nn.Parameter] = None

    def init_factors(self, rank: int, generator: Optional[torch.Generator] = None) -> None:
        """A ~ kaiming_uniform(a=sqrt(5)) (bound 1/sqrt(d_in)), B = 0: the same draw as SD-LoRA's."""
        bound = 1.0 / math.sqrt(self.in_features)
        a = torch.rand(rank, self.in_features, generator=generator, dtype=torch.float32) * 2 * bound - bound
        self.lora_a = nn.Parameter(a.to(self.weight))
        self.lora_b = nn.Parameter(self.weight.new_zeros(self.out_features, rank))

    def reshape_for(self, rank: Optional[int]) -> None:
        self.lora_a = self.lora_b = None
        if rank is not None:
            self.lora_a = nn.Parameter(self.weight.new_zeros(rank, self.in_features))
            self.lora_b = nn.Parameter(self.weight.new_zeros(self.out_features, rank))

    def update_terms(self) -> tuple:
        """s B A as the shared op's terms: no frozen columns, the LoRA as the current task's."""
        return (self._no_a, self._no_b, self._no_s, self.lora_a, self.lora_b,
                None if self.lora_a is None else self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_out)
        if self._merged is not None:
            return nn.functional.linear(x, self._merged.to(x.dtype), self.bias)
        if self.lora_a is None:
            return nn.functional.linear(x, self.weight, self.bias)
        return stacked_lowrank_linear(x, self.weight, self.bias, *self.update_terms(), impl=self.impl)

    def extra_repr(self) -> str:
        rank = None if self.lora_a is None else self.lora_a.shape[0]
        return f"in={self.in_features}, out={self.out_features}, rank={rank}, scaling={float(self.scaling)}"


class SeqLoRAModel(IncrementalViT):
    """Sequential fine-tuning of a single LoRA per projection (no decoupling, no freezing)."""
    method = "seq_lora"

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self._wrap_targets(lambda linear: LoRALinear(linear, impl=cfg.adapter.impl))

    def _start_adapters(self, task: int, gen: torch.Generator) -> None:
        if task == 0:  # one LoRA for the whole sequence: created once, then trained on every task
            for layer in self.layers:
                layer.init_factors(self.adapter_cfg.rank, generator=gen)

    def trainable_parameters(self) -> list:
        params = [p for layer in self.layers for p in (layer.lora_a, layer.lora_b) if p is not None]
        return params + [self.head.weight, self.head.bias]

    def _structure(self) -> dict:
        return {"lora_ranks": [None if layer.lora_a is None else layer.lora_a.shape[0] for layer in self.layers]}

    def _restore_structure(self, s: dict) -> None:
        if len(s["lora_ranks"]) != len(self.layers):
            raise ValueError(f"config field 'backbone': the model was saved with {len(s['lora_ranks'])} adapted "
                             f"projections, this backbone has {len(self.layers)}")
        for layer, rank in zip(self.layers, s["lora_ranks"]):
            layer.reshape_for(rank)


class LinearProbeModel(IncrementalViT):
    """Frozen backbone; only the growing linear classifier trains."""
    method = "linear_probe"

    def _start_adapters(self, task: int, gen: torch.Generator) -> None:
        pass  # nothing but the head grows

    def trainable_parameters(self) -> list:
        return [self.head.weight, self.head.bias]


class NCMModel(IncrementalViT):
    """Nearest class mean on frozen features, cosine similarity. The head's rows hold the unit-norm
    class means and its bias stays 0, so logits = W f / ||f|| (cosines). Export writes the same W and
    a plain linear head: its logits are the cosines times ||f|| > 0, hence the same predictions.
    The class means come from the trainer's 'task_start' pass over the task's train images."""
    method = "ncm"
    trains = False
    observes = ("task_start",)

    def _start_adapters(self, task: int, gen: torch.Generator) -> None:
        pass  # the head grows (random rows, replaced by set_prototypes before any evaluation)

    def trainable_parameters(self) -> list:
        return []

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, C_seen) cosines
        f = nn.functional.normalize(self.features(pixel_values), dim=-1)
        return nn.functional.linear(f, self.head.weight, self.head.bias)

    def export_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:  # ||f|| * cosines: same argmax
        return self.head(self.features(pixel_values))

    def observe(self, phase: str, t: int, pixel_values: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor) -> None:
        if not hasattr(self, "_sums"):  # float64 sums per class of task t: the mean does not depend on batch order
            self._sums = torch.zeros(self.task_sizes[-1], self.head.in_features, dtype=torch.float64)
            self._counts = torch.zeros(self.task_sizes[-1], dtype=torch.float64)
        f = self.features(pixel_values).double().cpu()  # (B, d)
        self._sums.index_add_(0, rows[keep], f[keep])
        self._counts += torch.bincount(rows[keep], minlength=self.task_sizes[-1]).double()

    def observed(self, phase: str, t: int, reduce) -> str:
        sums, counts = reduce(self._sums), reduce(self._counts)
        del self._sums, self._counts
        self.set_prototypes(self.known_classes, sums, counts)
        self.events.append({"kind": "ncm_class_means", "task": t, "images": int(counts.sum()),
                            "per_class": [int(c) for c in counts]})
        return f"task {t}: class means of {int(counts.sum())} train images"

    @torch.no_grad()
    def set_prototypes(self, first_row: int, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """Rows first_row.. of the head := normalize(sums / counts) (sums: (n, d), counts: (n,))."""
        if bool((counts <= 0).any()):
            empty = [first_row + i for i in torch.nonzero(counts <= 0).flatten().tolist()]
            raise ValueError(f"NCM: head rows {empty} have no train image; every class needs at least one "
                             f"(check the shard index's train split)")
        means = sums.double() / counts.double().unsqueeze(1)
        rows = nn.functional.normalize(means, dim=-1).to(self.head.weight)
        self.head.weight[first_row:first_row + rows.shape[0]] = rows
        self.head.bias[first_row:first_row + rows.shape[0]] = 0
