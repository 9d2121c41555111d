"""O-LoRA (Wang et al., 2023, "Orthogonal Subspace Learning for Language Model Continual Learning").

Every task t gets a fresh LoRA on every adapted projection; the LoRAs of earlier tasks are frozen
and summed, and no task id is used at test time:

    y = W x + b + s B_t A_t x + s sum_{i<t} B_i A_i x

While task t trains, the loss adds the orthogonality penalty on each adapted projection p

    orth_lambda * sum_p sum_{i<t} || A_i^p (A_t^p)^T ||_1        (sum of absolute values)

which pushes the rows of A_t (the input directions the new update reads) away from the earlier
tasks' rows, so the new update interferes little with the inputs the old ones respond to. The
paper's second regulariser (an L2 penalty on the new LoRA, lambda_2) is not part of this module.

Differences from the paper's setting (a T5/LLaMA language model, task-wise instruction tuning):
the adapted projections are the config's adapter.target_modules (query/value, as in the paper),
the LoRA scaling s is method_options.scaling (1.0: seq_lora's and SD-LoRA's initial magnitude), A is
initialised as seq_lora's (kaiming-uniform, B = 0, the same generator), and the classifier is the
harness's growing head trained with the masked cross-entropy like every other method here.
The paper reports language-model benchmarks only: no published figure applies to these image
settings (docs/adding_a_method.md, section 8).

Frozen LoRAs live stacked in buffers (never in an optimizer: bitwise frozen), so the forward is the
same stacked low-rank op SD-LoRA uses and the cost of a step does not grow with the number of tasks;
`TaskLoRALinear` is that layer, also used by InfLoRA (methods/inflora.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..config import ConfigError, RunConfig
from ..kernels import stacked_lowrank_linear
from ..model.base import IncrementalViT
from ..model.baselines import LoRALinear
from ..registry import Method


@dataclass
class OLoRAOptions:
    orth_lambda: float = 0.5
    """lambda of the orthogonality loss lambda * sum_p sum_{i<t} ||A_i A_t^T||_1 over the adapted
    projections p (the paper's lambda_1 = 0.5). 0 turns it off (sequential LoRAs, earlier ones frozen)."""
    scaling: float = 1.0
    """s in y = W x + b + s sum_i B_i A_i x (1.0: seq_lora's scaling, SD-LoRA's initial magnitude)."""

    def validate(self, p: str) -> None:
        if self.orth_lambda < 0:
            raise ConfigError(f"config field '{p}.orth_lambda': got {self.orth_lambda!r}; must be >= 0 "
                              f"(0 turns the penalty off)")
        if self.scaling <= 0:
            raise ConfigError(f"config field '{p}.scaling': got {self.scaling!r}; must be > 0 (1.0 is the usual)")


class TaskLoRALinear(LoRALinear):
    """nn.Linear + one LoRA per task: finished tasks' factors stacked in buffers (a_frozen (R_f, d_in),
    b_frozen (d_out, R_f), all scaled by s), the current task's lora_a / lora_b as in LoRALinear.
    `penalise`: the forward also computes || a_frozen lora_a^T ||_1 (O-LoRA), inside the layer's own
    forward where ZeRO-3 has lora_a gathered; the model collects it with `take_penalty`."""

    def __init__(self, base: nn.Linear, scaling: float, impl: str = "auto", penalise: bool = False):
        super().__init__(base, scaling=scaling, impl=impl)
        w = base.weight
        self.register_buffer("a_frozen", w.new_zeros(0, self.in_features))
        self.register_buffer("b_frozen", w.new_zeros(self.out_features, 0))
        self.register_buffer("frozen_ranks", torch.zeros(0, dtype=torch.long, device=w.device))
        self.penalise = penalise
        self._penalty: Optional[torch.Tensor] = None

    def freeze_current(self) -> None:
        """Stack the current task's factors under the frozen ones (values unchanged) and drop them."""
        if self.lora_a is None:
            return
        a, b = self.lora_a.detach(), self.lora_b.detach()
        self.a_frozen = torch.cat([self.a_frozen, a.to(self.a_frozen)])
        self.b_frozen = torch.cat([self.b_frozen, b.to(self.b_frozen)], dim=1)
        self.frozen_ranks = torch.cat([self.frozen_ranks, self.frozen_ranks.new_tensor([a.shape[0]])])
        self.lora_a = self.lora_b = None

    def set_current(self, a: torch.Tensor, train_a: bool = True) -> None:
        """The current task's LoRA: A = a (r, d_in), a Parameter, or a buffer when A is designed and
        fixed (InfLoRA: not partitioned by ZeRO-3, so it can be written after the engine is built);
        B = 0, trainable."""
        for name in ("lora_a", "lora_b"):  # whatever it was (Parameter, buffer or None), it is replaced
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)
            self.__dict__.pop(name, None)
        if train_a:
            self.lora_a = nn.Parameter(a)
        else:
            self.register_buffer("lora_a", a)
        self.lora_b = nn.Parameter(self.weight.new_zeros(self.out_features, a.shape[0]))

    def reshape_for(self, frozen_ranks: list, current_rank: Optional[int] = None, train_a: bool = True) -> None:
        """Shapes of a checkpoint's layer before load_state_dict."""
        w, r = self.weight, sum(frozen_ranks)
        self.a_frozen, self.b_frozen = w.new_zeros(r, self.in_features), w.new_zeros(self.out_features, r)
        self.frozen_ranks = torch.tensor(frozen_ranks, dtype=torch.long, device=w.device)
        self.lora_a = self.lora_b = None
        if current_rank is not None:
            self.set_current(w.new_zeros(current_rank, self.in_features), train_a)

    def ranks(self) -> list:
        """[frozen ranks per task, current rank or None]: what structure() records (JSON-able)."""
        return [self.frozen_ranks.tolist(), None if self.lora_a is None else self.lora_a.shape[0]]

    def update_terms(self) -> tuple:
        """s B_f A_f (every frozen column scaled by s) + s B_t A_t."""
        s_frozen = self.scaling.reshape(1).expand(self.a_frozen.shape[0]).contiguous()  # (R_f,)
        return (self.a_frozen, self.b_frozen, s_frozen, self.lora_a, self.lora_b,
                None if self.lora_a is None else self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_out)
        if self._merged is not None:
            return nn.functional.linear(x, self._merged.to(x.dtype), self.bias)
        if self.penalise and self.training and self.lora_a is not None and self.a_frozen.shape[0]:
            # (R_f, r): every frozen row against every current row; fp32 whatever the autocast
            self._penalty = (self.a_frozen.float() @ self.lora_a.float().t()).abs().sum()
        if self.lora_a is None and not self.a_frozen.shape[0]:
            return nn.functional.linear(x, self.weight, self.bias)
        return stacked_lowrank_linear(x, self.weight, self.bias, *self.update_terms(), impl=self.impl)

    def take_penalty(self) -> Optional[torch.Tensor]:
        """The penalty of the last training forward (None if there was none); cleared."""
        p, self._penalty = self._penalty, None
        return p

    def extra_repr(self) -> str:
        frozen, cur = self.ranks()
        return f"in={self.in_features}, out={self.out_features}, frozen_ranks={frozen}, rank={cur}, " \
               f"scaling={float(self.scaling)}"


class TaskLoRAModel(IncrementalViT):
    """Frozen ViT + a TaskLoRALinear per adapted projection + growing classifier: the structure
    O-LoRA and InfLoRA share (a new LoRA per task, earlier ones frozen and summed)."""
    layer_class = TaskLoRALinear
    trains_a = True  # False: the current A is a fixed buffer (InfLoRA designs it), only B trains

    def __init__(self, cfg: RunConfig, scaling: float, penalise: bool = False):
        super().__init__(cfg)
        self._wrap_targets(lambda linear: self.layer_class(linear, scaling, impl=cfg.adapter.impl, penalise=penalise))

    def _start_adapters(self, task: int, gen: torch.Generator) -> None:
        for layer in self.layers:
            layer.freeze_current()
            layer.init_factors(self.adapter_cfg.rank, generator=gen)

    def trainable_parameters(self) -> list:
        params = [p for layer in self.layers for p in (layer.lora_a, layer.lora_b) if isinstance(p, nn.Parameter)]
        return params + [self.head.weight, self.head.bias]

    def _structure(self) -> dict:
        return {"lora_ranks": [layer.ranks() for layer in self.layers]}

    def _restore_structure(self, s: dict) -> None:
        if len(s["lora_ranks"]) != len(self.layers):
            raise ValueError(f"config field 'backbone': the model was saved with {len(s['lora_ranks'])} adapted "
                             f"projections, this backbone has {len(self.layers)}")
        for layer, (frozen, cur) in zip(self.layers, s["lora_ranks"]):
            layer.reshape_for(frozen, cur, self.trains_a)


class OLoRAModel(TaskLoRAModel):
    method = "olora"

    def __init__(self, cfg: RunConfig):
        opts = cfg.options
        super().__init__(cfg, opts.scaling, penalise=opts.orth_lambda > 0)
        self.orth_lambda = opts.orth_lambda

    def loss_terms(self) -> dict:
        """{'orthogonality': orth_lambda * sum over projections of ||A_i A_t^T||_1} from task 1 on."""
        penalties = [p for p in (layer.take_penalty() for layer in self.layers) if p is not None]
        return {"orthogonality": self.orth_lambda * torch.stack(penalties).sum()} if penalties else {}


METHOD = Method(name="olora", label="O-LoRA", model=OLoRAModel, options=OLoRAOptions, stacks_per_task=True)
