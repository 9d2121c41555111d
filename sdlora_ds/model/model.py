"""SDLoRAModel: frozen ViT + SD-LoRA projections + shared magnitudes + growing classifier.

Task lifecycle (called by the trainer, identically on every rank):
    start_task(t, n_new)  freeze task t-1's directions (norms computed once), grow the magnitudes,
                          [SD-LoRA-KD: fold task t-1's direction where earlier ones explain it],
                          add A_t/B_t (rank adapter.rank_of(t): SD-LoRA-RR) to every adapted
                          projection, grow the classifier
    ... train, evaluate ...
A checkpoint records `structure()`; `restore_structure()` reshapes a fresh model before
load_state_dict.
"""
from __future__ import annotations

import torch

from ..config import RunConfig
from .base import IncrementalViT
from .kd import fold_new_directions
from .sdlora import Magnitudes, SDLoRALinear


class SDLoRAModel(IncrementalViT):
    method = "sdlora"

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.magnitudes = Magnitudes()
        a = cfg.adapter
        self._wrap_targets(lambda linear: SDLoRALinear(linear, self.magnitudes, norm=a.norm, impl=a.impl))
        self.boundary = None  # diagnostics of the last task boundary (set by start_task; boundaries.py reads it)

    # ------------------------------------------------------------------ tasks
    def _start_adapters(self, task: int, gen: torch.Generator) -> None:
        a = self.adapter_cfg
        # Each frozen task's coefficient on its raw B_j A_j before the boundary: the current task's
        # m_t (its direction is not normalised while it trains), (m_j + k_j + k_j^p) / norm_j for older ones.
        before = [self._raw_coefficients(layer) for layer in self.layers]
        factors = [layer.current_factor_norms() for layer in self.layers]
        m_end = self.magnitudes().detach().tolist()  # (m + k) at the end of task-1
        for layer in self.layers:
            layer.freeze_current()
        self.magnitudes.grow(a.magnitude_init, a.magnitude_reset)
        if a.freeze == "continuous":  # every frozen direction keeps its contribution (config: adapter.freeze)
            mk = self.magnitudes().detach()
            for layer, c in zip(self.layers, before):
                layer.preserve_coefficients(c, mk)
        if task >= 1:
            after = [self._raw_coefficients(layer) for layer in self.layers]
            self.boundary = {"task": task - 1, "m_end": m_end, "layers": [
                {"name": name, **f, "coef_before": c0[task - 1], "coef_after": c1[task - 1],
                 "jump": abs(c1[task - 1]) / abs(c0[task - 1]) if c0[task - 1] != 0 else float("inf")}
                for name, f, c0, c1 in zip(self.layer_names, factors, before, after)]}
        # KD runs here, after task-1's direction is normalised (freeze) and the magnitudes hold the
        # values they start task `task` with (grow): what the direction would carry is known, so the
        # fold preserves the function the next task starts from (model/kd.py).
        if a.kd.enabled and task >= 2:  # "after each task t > 0": t = task - 1
            self.events.extend(fold_new_directions(self, task - 1, a.kd.threshold))
        for layer in self.layers:
            layer.add_direction(a.rank_of(task), generator=gen)

    def _raw_coefficients(self, layer: SDLoRALinear) -> list:
        """Per task j of `layer`: the scalar multiplying its raw B_j A_j in the forward (floats)."""
        mk = self.magnitudes().detach().double()
        t = layer.num_frozen
        coef = ((mk[:t] + layer.frozen_k.double()) * layer.frozen_inv_norm.double()).tolist()
        if layer.a_cur is not None:
            coef.append(float(mk[t]))
        return coef

    def trainable_parameters(self) -> list:
        """A_t, B_t of every projection, all magnitudes, the classifier; nothing else."""
        params = [p for layer in self.layers for p in (layer.a_cur, layer.b_cur) if p is not None]
        return params + [self.magnitudes.m, self.head.weight, self.head.bias]

    # ------------------------------------------------------------------ checkpoint structure
    def _structure(self) -> dict:
        return {"frozen_ranks": [layer.frozen_ranks.tolist() for layer in self.layers],
                "current_ranks": [None if layer.a_cur is None else layer.a_cur.shape[0] for layer in self.layers]}

    def _restore_structure(self, s: dict) -> None:
        if len(s["frozen_ranks"]) != len(self.layers):
            raise ValueError(f"config field 'backbone': the model was saved with {len(s['frozen_ranks'])} adapted "
                             f"projections, this backbone has {len(self.layers)}")
        for layer, fr, cr in zip(self.layers, s["frozen_ranks"], s["current_ranks"]):
            layer.reshape_for(fr, cr)
        self.magnitudes.resize(len(s["task_sizes"]))
