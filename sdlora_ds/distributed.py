"""Accelerate / DeepSpeed glue: building the accelerator, rank facts, reductions.

On CPU, accelerate does not create a process group for DeepSpeed by itself (ENVIRONMENT.md), so the
backend is always passed explicitly: gloo on CPU, nccl with CUDA. The collective timeout comes from
the config, so a dead peer fails the run instead of hanging it.
"""
from __future__ import annotations

import datetime
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from .config import RunConfig


def make_accelerator(cfg: RunConfig) -> Accelerator:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true"
    handlers = [
        # Frozen directions are buffers, identical on every rank by construction: broadcasting them at
        # every forward would cost O(tasks) traffic per step for nothing.
        DistributedDataParallelKwargs(broadcast_buffers=False),
    ]
    if world > 1 or deepspeed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=datetime.timedelta(seconds=cfg.dist.timeout_s)))
    # Without CUDA, cpu=True is what makes accelerate build a MULTI_CPU (gloo) state from the launcher's
    # torchrun environment; DeepSpeed selects its own CPU accelerator and must not get cpu=True.
    # (A single process needs neither: plain `python` or a 1-process launch just runs on the CPU.)
    cpu = not torch.cuda.is_available() and world > 1 and not deepspeed
    return Accelerator(cpu=cpu, mixed_precision=cfg.dist.mixed_precision, kwargs_handlers=handlers)


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def configure_deepspeed_batch(accelerator: Accelerator, micro: int, accum: int) -> None:
    """DeepSpeed checks micro x accum x world == train_batch_size; we never prepare a DataLoader,
    so the numbers are set here from the config's batch plan."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = micro * accum * accelerator.num_processes
    plugin.gradient_accumulation_steps = accum


def sum_across_ranks(accelerator: Accelerator, t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (evaluation counters)."""
    if accelerator.num_processes == 1:
        return t
    return accelerator.reduce(t.to(accelerator.device), reduction="sum").cpu()
