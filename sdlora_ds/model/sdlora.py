"""The SD-LoRA projection (SPEC section 1) and the magnitudes every projection shares.

    y = W x + b + m_t B_t A_t x + sum_{i<t} (m_i + k_i + k_i^p) B_i A_i x / norm_i

k_i is the shared assimilated magnitude (Magnitudes.k) and k_i^p the projection's own
(`SDLoRALinear.frozen_k`). SD-LoRA-KD writes only k_i^p: its least-squares fit is per projection,
so the coefficients differ between projections and only a per-projection k preserves the function
(model/kd.py; LibContinual also keeps one assimilated vector per projection).

`SDLoRALinear` replaces an nn.Linear in place and keeps its `weight`/`bias` names, so backbone keys
stay loadable and export can write the merged weight under the original name. The frozen
directions of all earlier tasks live stacked in buffers (A_f: (R_f, d_in), B_f: (d_out, R_f)); the
update is computed in weight space by `kernels.stacked_lowrank_linear`, so the cost of a step does
not grow with the number of tasks (no loop over tasks in forward).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from ..kernels import merge_weight, stacked_lowrank_linear


class Magnitudes(nn.Module):
    """m_0..m_t (trainable, one scalar per task) and k_0..k_t (assimilated), shared by every adapted
    projection of every block. KD does not write k (its coefficients are per projection: see
    SDLoRALinear.frozen_k); k stays 0 in every shipped variant and is kept as the SPEC's shared term.

    The projections call this module (`mags()`) instead of reading `.m`: a module call is what
    DeepSpeed ZeRO-3 hooks to gather parameters, so the shared vector is always complete when read.
    (It is also far below ZeRO-3's parameter persistence threshold, so it is never partitioned.)
    """

    def __init__(self):
        super().__init__()
        self.m = nn.Parameter(torch.zeros(0))
        self.register_buffer("k", torch.zeros(0))

    @property
    def num_tasks(self) -> int:
        return self.m.numel()

    def grow(self, init: float, reset: bool) -> None:
        """Add the next task's magnitude. reset=True re-creates all of them with `init` (reference)."""
        old = self.m.detach()
        new = torch.full((old.numel() + 1,), float(init), dtype=old.dtype, device=old.device)
        if not reset:
            new[:-1] = old
        self.m = nn.Parameter(new)
        self.k = torch.cat([self.k, self.k.new_zeros(1)])

    def resize(self, n: int) -> None:
        """Shape the tensors for `n` tasks (before load_state_dict of a checkpoint)."""
        self.m = nn.Parameter(self.m.new_zeros(n))
        self.k = self.k.new_zeros(n)

    def forward(self) -> torch.Tensor:
        return self.m + self.k  # (T,)


class MergeableLinear(nn.Module):
    """Wraps a frozen nn.Linear (same `weight`/`bias` Parameters, so backbone keys stay loadable) and
    can fold its update into the weight once for evaluation.

    Subclasses define `update_terms()`, the one source of the update (PEFT's get_delta_weight
    role): the stacked factors and their scales, which forward, `delta_weight` (B diag(s) A alone)
    and `merged_weight` (W + B diag(s) A, feeding merged evaluation and export) all take. The merge
    adds the update to W inside one fp32 accumulation rather than as W + delta_weight(), so the
    merged weight is rounded once. While `merged()` is active, forward is a plain linear."""

    _merged: Optional[torch.Tensor] = None

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight.requires_grad_(False)  # frozen, same Parameter object (no copy)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def update_terms(self) -> tuple:
        """(a_frozen (R_f, d_in), b_frozen (d_out, R_f), s_frozen (R_f,), a_cur (r, d_in) or None,
        b_cur (d_out, r) or None, m_cur 0-dim or None): the update is B_f diag(s_f) A_f + m_cur B_c A_c."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The whole update as a dense (d_out, d_in) matrix, without W."""
        return merge_weight(torch.zeros_like(self.weight), *self.update_terms())

    def merged_weight(self) -> torch.Tensor:
        """W + the update, (d_out, d_in), accumulated in fp32 and rounded once."""
        return merge_weight(self.weight, *self.update_terms())

    @contextmanager
    def merged(self):
        """Evaluation: merge once, then every forward is a plain linear layer."""
        with torch.no_grad():
            self._merged = self.merged_weight()
        try:
            yield
        finally:
            self._merged = None


class SDLoRALinear(MergeableLinear):
    """nn.Linear + stacked SD-LoRA directions. State per task i < t: rows of a_frozen / columns of
    b_frozen, `frozen_inv_norm[i]` (0 for a zero direction: it contributes nothing), the rank and
    `frozen_k[i]`, this projection's assimilated magnitude (0 unless SD-LoRA-KD folded a later
    direction into task i here). The current task t owns the trainable a_cur (r, d_in) and b_cur (d_out, r)."""

    def __init__(self, base: nn.Linear, magnitudes: Magnitudes, norm: str = "factors", impl: str = "auto"):
        super().__init__(base)
        self.norm, self.impl = norm, impl
        # Not a registered submodule: the magnitudes belong to the model, not to each layer.
        object.__setattr__(self, "_mags", magnitudes)
        w = base.weight
        self.register_buffer("a_frozen", w.new_zeros(0, self.in_features))
        self.register_buffer("b_frozen", w.new_zeros(self.out_features, 0))
        self.register_buffer("frozen_inv_norm", w.new_zeros(0))
        self.register_buffer("frozen_k", w.new_zeros(0))  # (T_f,) per-projection assimilated magnitudes
        self.register_buffer("frozen_ranks", torch.zeros(0, dtype=torch.long, device=w.device))
        self.register_buffer("col_task", torch.zeros(0, dtype=torch.long, device=w.device))  # (R_f,)
        self.a_cur: Optional[nn.Parameter] = None
        self.b_cur: Optional[nn.Parameter] = None

    # -------------------------------------------------------------- task lifecycle
    @property
    def num_frozen(self) -> int:
        return self.frozen_ranks.numel()

    def add_direction(self, rank: int, generator: Optional[torch.Generator] = None) -> None:
        """Start a task: A ~ kaiming_uniform(a=sqrt(5)), B = 0 (so the update starts at zero)."""
        assert self.a_cur is None, "freeze_current() must run before a new direction is added"
        a = torch.empty(rank, self.in_features, dtype=self.weight.dtype, device=self.weight.device)
        # kaiming_uniform(a=sqrt(5)) on a (rank, d_in) tensor: bound = 1/sqrt(d_in); drawn from an
        # explicit generator so every rank (and a resumed run) gets identical factors.
        bound = 1.0 / math.sqrt(self.in_features)
        a.copy_(torch.rand(a.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound)
        self.a_cur = nn.Parameter(a)
        self.b_cur = nn.Parameter(torch.zeros(self.out_features, rank, dtype=a.dtype, device=a.device))

    def direction_norm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """||B||_F ||A||_F ('factors', reference code) or ||B A||_F ('product', paper notation)."""
        dt = torch.promote_types(a.dtype, torch.float32)  # at least fp32, even for bf16 factors
        a, b = a.detach().to(dt), b.detach().to(dt)
        return b.norm() * a.norm() if self.norm == "factors" else (b @ a).norm()

    def current_factor_norms(self) -> dict:
        """||B_t||_F, ||A_t||_F and ||B_t A_t||_F of the current direction (floats; {} if none)."""
        if self.a_cur is None:
            return {}
        a, b = self.a_cur.detach().double(), self.b_cur.detach().double()
        return {"norm_b": float(b.norm()), "norm_a": float(a.norm()), "norm_ba": float((b @ a).norm())}

    def preserve_coefficients(self, coef: list, mk: torch.Tensor) -> None:
        """adapter.freeze = 'continuous': set this projection's assimilated magnitudes so that each
        frozen task j multiplies its raw B_j A_j by coef[j] again, whatever the shared magnitudes
        mk = m + k (T,) now hold: (mk_j + k_j^p) * inv_norm_j = coef_j. Zero directions are left alone."""
        t = self.num_frozen
        assert len(coef) == t, "one coefficient per frozen task"
        c = torch.tensor(coef, dtype=torch.float64)
        inv = self.frozen_inv_norm.double().cpu()
        k = torch.where(inv > 0, c / inv.clamp_min(1e-300) - mk[:t].double().cpu(), self.frozen_k.double().cpu())
        self.frozen_k = k.to(self.frozen_k)

    def freeze_current(self) -> None:
        """End of a task: stack the current direction into the frozen buffers; its norm is computed
        once here, never per step."""
        if self.a_cur is None:
            return
        a, b = self.a_cur.detach(), self.b_cur.detach()
        n = self.direction_norm(a, b)
        inv = torch.where(n > 0, 1.0 / n.clamp_min(1e-30), torch.zeros_like(n))
        t = self.num_frozen
        self.a_frozen = torch.cat([self.a_frozen, a])
        self.b_frozen = torch.cat([self.b_frozen, b], dim=1)
        self.frozen_inv_norm = torch.cat([self.frozen_inv_norm, inv.reshape(1).to(self.frozen_inv_norm.dtype)])
        self.frozen_k = torch.cat([self.frozen_k, self.frozen_k.new_zeros(1)])
        self.frozen_ranks = torch.cat([self.frozen_ranks, self.frozen_ranks.new_tensor([a.shape[0]])])
        self.col_task = torch.cat([self.col_task, self.col_task.new_full((a.shape[0],), t)])
        self.a_cur = self.b_cur = None

    def task_columns(self, task: int) -> slice:
        """The columns of b_frozen (rows of a_frozen) that belong to frozen task `task`."""
        ranks = self.frozen_ranks.tolist()  # host copy: called at task boundaries only, never per step
        start = sum(ranks[:task])
        return slice(start, start + ranks[task])

    def reshape_for(self, frozen_ranks: list, current_rank: Optional[int]) -> None:
        """Give the buffers/parameters the shapes of a checkpoint before load_state_dict."""
        w, R = self.weight, sum(frozen_ranks)
        self.a_frozen = w.new_zeros(R, self.in_features)
        self.b_frozen = w.new_zeros(self.out_features, R)
        self.frozen_inv_norm = w.new_zeros(len(frozen_ranks))
        self.frozen_k = w.new_zeros(len(frozen_ranks))
        self.frozen_ranks = torch.tensor(frozen_ranks, dtype=torch.long, device=w.device)
        self.col_task = torch.repeat_interleave(torch.arange(len(frozen_ranks), device=w.device), self.frozen_ranks)
        self.a_cur = self.b_cur = None
        if current_rank is not None:
            self.a_cur = nn.Parameter(w.new_zeros(current_rank, self.in_features))
            self.b_cur = nn.Parameter(w.new_zeros(self.out_features, current_rank))

    # -------------------------------------------------------------- math
    def _scales(self):
        """(s_frozen (R_f,), m_cur 0-dim or None) from the shared magnitudes."""
        mk = self._mags()  # (T,) = m + k
        t = self.num_frozen
        assert mk.numel() >= t + (self.a_cur is not None), "magnitudes and directions out of step"
        s_frozen = ((mk[:t] + self.frozen_k) * self.frozen_inv_norm)[self.col_task]  # per task -> per column, no host sync
        m_cur = mk[t] if self.a_cur is not None else None
        return s_frozen, m_cur

    def update_terms(self) -> tuple:
        s_frozen, m_cur = self._scales()
        return self.a_frozen, self.b_frozen, s_frozen, self.a_cur, self.b_cur, m_cur

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, d_in)
        if self._merged is not None:
            return nn.functional.linear(x, self._merged.to(x.dtype), self.bias)
        return stacked_lowrank_linear(x, self.weight, self.bias, *self.update_terms(), impl=self.impl)

    def extra_repr(self) -> str:
        cur = None if self.a_cur is None else self.a_cur.shape[0]
        return (f"in={self.in_features}, out={self.out_features}, frozen_ranks={self.frozen_ranks.tolist()}, "
                f"current_rank={cur}, norm={self.norm}")
