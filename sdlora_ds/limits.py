"""How many tasks a config can hold, and the refusal of a plan that exceeds it (before training).

SD-LoRA stacks every finished task's direction into two buffers per adapted projection,
a_frozen (R, d_in) and b_frozen (d_out, R), where R = the sum of the ranks of all tasks but the
last (model/sdlora.py). Nothing else in the model has a size fixed in advance: the magnitudes (T,),
the classifier (C, d) and the per-task bookkeeping all grow with the run. So the limits on T are:

1. a task's rank cannot exceed the narrower side of an adapted projection (min(d_in, d_out) = d for
   the query/value projections of a ViT): a rank-r factor pair of a d x d matrix has rank <= d, the
   extra columns would only be noise the normalisation divides by;
2. the Triton kernels (kernels/triton_stacked.py) address the stacked factors with 32-bit offsets
   (row * stride: R x d_in for A, d_out x R for B): R x max(d_in, d_out) must stay below 2^31, i.e.
   R <= 2,796,202 for d = 768 (T <= 279,620 at rank 10) and half that for d = 1536. The PyTorch
   implementation ('reference') indexes with 64 bits; the limit is enforced for every impl so that a
   plan checked on a CPU also runs on a GPU;
3. memory: the frozen factors take 4 (d_in + d_out) R bytes per projection in fp32 (ViT-B/16, 24
   query/value projections, rank 10: 1.47 MB per task, 295 MB at T = 200). This depends on the
   device and is reported (`frozen_factor_bytes`), not refused.

`check_plan(cfg, width)` raises ConfigError (one line, the dotted field and the fix) for 1 and 2;
config validation runs it for a backbone built from the config (width known), the preflight for a
pretrained one (width read from the folder's config.json or the .safetensors header).
"""
from __future__ import annotations

import json
import os
from typing import Optional

from .errors import ConfigError
from .registry import methods

INT32_LIMIT = 2 ** 31  # offsets of the Triton kernels are int32: every offset must stay below this


def total_rank(adapter, num_tasks: int) -> int:
    """R after the last task: the sum of every task's rank under adapter.rank_schedule."""
    if adapter.rank_schedule is None:
        return adapter.rank * num_tasks
    total, sched = 0, adapter.rank_schedule
    for i, (first, rank) in enumerate(sched):  # piecewise constant: one multiplication per entry
        end = num_tasks if i + 1 == len(sched) else min(sched[i + 1][0], num_tasks)
        total += rank * max(end - first, 0)
    return total


def max_tasks(adapter, width: int) -> int:
    """The largest num_tasks whose stacked factors stay addressable with 32-bit offsets at `width`."""
    limit = (INT32_LIMIT - 1) // width  # largest R
    lo, hi = 0, limit + 1  # total_rank(lo) <= limit < total_rank(hi): ranks are >= 1
    while hi - lo > 1:  # total_rank grows with T: bisect
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total_rank(adapter, mid) <= limit else (lo, mid)
    return lo

def frozen_factor_bytes(adapter, num_tasks: int, d_in: int, d_out: int, projections: int,
                        bytes_per_value: int = 4) -> int:
    """Bytes of the frozen factors of all projections after `num_tasks` tasks."""
    return total_rank(adapter, num_tasks) * (d_in + d_out) * projections * bytes_per_value


def check_plan(cfg, width: Optional[int]) -> None:
    """ConfigError if the run's plan exceeds a limit of the stacked factors (see the module doc);
    `width`: the backbone's hidden size (the adapted projections are width x width), None = unknown.
    Only methods that stack a direction per task (registry: stacks_per_task) have a per-task limit."""
    if width is None or not methods()[cfg.method].stacks_per_task:
        return
    a, T = cfg.adapter, cfg.cil.num_tasks
    ranks = [a.rank] if a.rank_schedule is None else [r for _, r in a.rank_schedule]
    if max(ranks) > width:
        field = "adapter.rank" if a.rank_schedule is None else "adapter.rank_schedule"
        raise ConfigError(f"config field '{field}': rank {max(ranks)} exceeds the backbone width {width} (the "
                          f"adapted projections are {width} x {width}, so a direction has rank <= {width}); "
                          f"use a rank <= {width}")
    R = total_rank(a, T)
    if R * width >= INT32_LIMIT:
        raise ConfigError(f"config field 'cil.num_tasks': {T} tasks stack {R:,} LoRA columns per projection, "
                          f"{R:,} x width {width} >= 2^31 (the stacked-factor kernels use 32-bit offsets); at "
                          f"most {max_tasks(a, width):,} tasks with this rank schedule: lower cil.num_tasks or "
                          f"adapter.rank")


def pretrained_width(path: str) -> Optional[int]:
    """The hidden size of a pretrained backbone without loading it: a folder's config.json, or the
    patch embedding's output width in a .safetensors header; None when neither says."""
    if os.path.isdir(path):
        cfg_file = os.path.join(path, "config.json")
        if os.path.isfile(cfg_file):
            with open(cfg_file) as f:
                width = json.load(f).get("hidden_size")
            return width if isinstance(width, int) else None
        return None
    if path.endswith(".safetensors") and os.path.isfile(path):
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # timm 'patch_embed.proj.weight', transformers '...patch_embeddings.projection.weight'
                if key.endswith(("patch_embed.proj.weight", "patch_embeddings.projection.weight")):
                    return int(f.get_slice(key).get_shape()[0])
    return None
