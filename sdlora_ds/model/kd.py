"""SD-LoRA-KD: fold a new direction that the earlier ones already explain into their magnitudes.

Run by SDLoRAModel.start_task(t + 1) for t >= 1, right after task t's direction was frozen (so it is
normalised) and the magnitudes were grown (so the value it carries into task t + 1 is known). For
every adapted projection p separately (q and v of every block):

    D_i = B_i A_i * inv_norm_i            the normalised direction exactly as the forward uses it
    alpha = argmin_a || D_t - sum_{i in P} a_i D_i ||_F^2      (flattened, float64 least squares)
    residual = that minimum, SQUARED
    if residual < adapter.kd.threshold:
        k_i^p += c * alpha_i  (i in P),   c = m_t + k_t + k_t^p, the magnitude D_t carries into task t+1
        A_t = B_t = 0, inv_norm_t = 0 in p      (the direction is gone: skipped from now on)

- The residual is squared because the SPEC's objective is the squared norm and the reference compares
  `torch.linalg.lstsq(...).residuals` — the sum of squared residuals — with 9e-4; keeping the square
  keeps the reference threshold's meaning. Scale: ||D_i||_F <= 1 under norm='factors'
  (||BA|| <= ||B|| ||A||) and = 1 under 'product', so residual <= ||D_t||^2 <= 1; 9e-4 means the new
  direction is explained up to ~3 % of a unit direction.
- c, not 1: the forward after the fold adds c * sum_i alpha_i D_i, which is c * D_t up to the
  residual, so the function task t+1 starts from is preserved. LibContinual adds the bare alpha_i,
  the same only when c = 1 (its magnitudes are re-created at 1.0 each task).
- Per projection: alpha differs between projections, so it goes to the projection's own
  assimilated magnitudes (SDLoRALinear.frozen_k), not to the shared Magnitudes.k: a shared k_i
  could not absorb different coefficients for different projections without changing the function
  of all the others (LibContinual, too, keeps one assimilated vector per q/v projection).
- P = earlier tasks whose direction is non-zero here: zero directions (never trained, or folded
  before) contribute nothing and would only make the system rank-deficient; their alpha is 0.
- Not copied from LibContinual: alpha is indexed by the loop over P (the reference indexes it with a
  stale variable), and the value branch fits value directions (the reference reuses query matrices).
- The last task's direction is never folded (there is no task after it to start).
- Every rank computes the same fit from the same buffers, on the CPU in float64, so the merge
  decisions agree without communication.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

from .sdlora import SDLoRALinear


def _dense_direction(layer: SDLoRALinear, i: int, inv: torch.Tensor) -> torch.Tensor:
    """(d_out * d_in,) float64 on the CPU: B_i A_i * inv_norm_i of frozen task i."""
    cols = layer.task_columns(i)
    b = layer.b_frozen[:, cols].detach().double().cpu()  # (d_out, r_i)
    a = layer.a_frozen[cols].detach().double().cpu()     # (r_i, d_in)
    return (b @ a).flatten() * inv[i]


@torch.no_grad()
def fit_direction(layer: SDLoRALinear, t: int) -> Optional[tuple]:
    """Least-squares fit of frozen task t's normalised direction on the earlier non-zero ones.
    Returns (P: list of task ids, alpha (|P|,) float64, squared residual) or None when there is
    nothing to fit (t's direction is zero, or no earlier direction is non-zero)."""
    if not 1 <= t < layer.num_frozen:
        raise ValueError(f"fit_direction: task {t} is not a frozen task > 0 (layer has {layer.num_frozen})")
    inv = layer.frozen_inv_norm.detach().double().cpu()  # (T_f,)
    if inv[t] == 0:
        return None
    prev = [i for i in range(t) if inv[i] > 0]
    if not prev:
        return None
    m = torch.stack([_dense_direction(layer, i, inv) for i in prev], dim=1)  # (d_out * d_in, |P|)
    y = _dense_direction(layer, t, inv)                                      # (d_out * d_in,)
    # gelsd (SVD) copes with nearly dependent earlier directions; lstsq's own `residuals` are empty
    # for rank-deficient systems, so the residual is computed explicitly.
    alpha = torch.linalg.lstsq(m, y.unsqueeze(1), driver="gelsd").solution.squeeze(1)  # (|P|,)
    residual = float(((y - m @ alpha) ** 2).sum())
    return prev, alpha, residual


@torch.no_grad()
def fold_direction(layer: SDLoRALinear, t: int, prev: list, alpha: torch.Tensor, carried: float) -> None:
    """k_i^p += carried * alpha_i for i in prev; zero task t's direction in this projection."""
    idx = torch.tensor(prev, dtype=torch.long, device=layer.frozen_k.device)
    layer.frozen_k[idx] += (carried * alpha).to(layer.frozen_k)
    cols = layer.task_columns(t)
    layer.a_frozen[cols] = 0
    layer.b_frozen[:, cols] = 0
    layer.frozen_inv_norm[t] = 0


def _block_of(name: str) -> Optional[int]:
    m = re.search(r"(?:^|\.)(\d+)\.", name)  # 'layers.3.attention.q_proj' / 'encoder.layer.3.attention...'
    return int(m.group(1)) if m else None


@torch.no_grad()
def fold_new_directions(model, t: int, threshold: float) -> list:
    """KD step for frozen task t over every adapted projection of `model` (an SDLoRAModel whose
    magnitudes already have their task t+1 values). Returns event dicts for model.events: one
    'kd_merge' per folded projection, then one 'kd_fit' summary (every residual, for choosing the
    threshold; 'scalars' are logged to TensorBoard by the trainer)."""
    mk = model.magnitudes().detach().double().cpu()  # (T,) m + k, values at the start of task t+1
    events, residuals = [], {}
    for name, layer in zip(model.layer_names, model.layers):
        fit = fit_direction(layer, t)
        if fit is None:
            continue
        prev, alpha, residual = fit
        residuals[name] = residual
        if residual < threshold:
            carried = float(mk[t] + layer.frozen_k[t].double().cpu())
            fold_direction(layer, t, prev, alpha, carried)
            events.append({"event": "kd_merge", "task": t, "block": _block_of(name),
                           "projection": name.rsplit(".", 1)[-1], "module": name, "residual": residual,
                           "alpha": [[i, float(a)] for i, a in zip(prev, alpha)], "carried_magnitude": carried})
    merged = len(events)
    scalars = {"kd/merged_projections": merged}
    if residuals:  # (no NaN placeholder: results.json must stay strict JSON)
        scalars["kd/min_residual"] = min(residuals.values())
    events.append({"event": "kd_fit", "task": t, "threshold": threshold, "merged": merged,
                   "fitted": len(residuals), "residuals": residuals, "scalars": scalars})
    return events
