"""`launch/train.py --dry-run`: the user's run, shortened, before GPU hours are spent on it.

The config is the user's, through the same launcher, model, data and checkpoint code, except:
- the run folder: output_dir/<name>-dry-run (the real run's folder is never touched);
- every task trains `steps` optimizer steps (optim.epochs = 1, optim.max_steps_per_epoch = steps),
  at the configured global batch, micro-batch, accumulation, precision and ZeRO stage;
- every evaluation sees a sample of about `eval_images` test images: train.eval_batch is lowered to
  ceil(eval_images / world size) per rank (if it was larger) and one batch per rank is evaluated
  (train.eval_max_batches). The sample is the test loader's first batch (the first classes' shards),
  so its accuracies check the plumbing, not the model.
So a wrong path, a shard that does not decode, a backbone that does not match, a batch plan or
precision that does not work, or a checkpoint that cannot be written shows in minutes.
"""
from __future__ import annotations

import copy
import os

from .config import ConfigError, RunConfig

SUFFIX = "-dry-run"
STEPS = 2
EVAL_IMAGES = 64


def dry_run_config(cfg: RunConfig, world_size: int, steps: int = STEPS, eval_images: int = EVAL_IMAGES) -> RunConfig:
    """The dry run's config: `cfg` with the changes listed in the module docstring (cfg untouched)."""
    if steps < 1:
        raise ConfigError(f"--dry-run-steps: got {steps}; give at least 1 optimizer step per task")
    if eval_images < 1:
        raise ConfigError(f"--dry-run-eval-images: got {eval_images}; give at least 1 test image")
    d = copy.deepcopy(cfg)
    d.name = f"{cfg.name}{SUFFIX}"
    d.optim.epochs = 1
    d.optim.max_steps_per_epoch = steps
    per_rank = -(-eval_images // world_size)
    d.train.eval_batch = min(cfg.train.eval_batch, per_rank)
    d.train.eval_max_batches = 1
    return d.validate()


def describe(cfg: RunConfig, dry: RunConfig, world_size: int) -> str:
    """What the dry run changes, printed before it starts."""
    micro, accum = dry.optim.batch_plan(world_size)
    sample = dry.train.eval_batch * dry.train.eval_max_batches * world_size
    return (f"dry run: run folder {dry.run_dir} (the real run's: {cfg.run_dir}); per task "
            f"{dry.optim.max_steps_per_epoch} optimizer step(s) of global batch {dry.optim.global_batch} "
            f"(micro-batch {micro} x accumulation {accum} x {world_size} process(es)) instead of "
            f"{cfg.optim.epochs} epoch(s){'' if cfg.optim.max_steps_per_epoch is None else ' of at most %d steps' % cfg.optim.max_steps_per_epoch}; "
            f"evaluation on a sample of at most {sample} test images after each task (eval batch "
            f"{dry.train.eval_batch} per rank, 1 batch); everything else as configured")


def is_first_process() -> bool:
    return os.environ.get("RANK", "0") == "0"
