"""The checks a process can make alone before training starts (no process group, no model).

launch/train.py runs them in every worker before the process group is created, and launch/run.py in
the launching process before any worker starts, so a user mistake (config, batch plan, run folder,
backbone path, shard index, --resume path) is one `error:` line and exit code 2, not a traceback
from inside a collective. The Trainer repeats what it needs (checksums, checkpoint choice).
"""
from __future__ import annotations

import os

from .config import ConfigError, RunConfig, load_config, missing_backbone_path, where
from .limits import check_plan, pretrained_width


def check_output_dir(cfg: RunConfig) -> None:
    """ConfigError unless the run folder output_dir/name exists as a writable folder or can be
    created (nothing is created here)."""
    run_dir = cfg.run_dir
    if os.path.exists(run_dir):
        if not os.path.isdir(run_dir):
            raise ConfigError(f"config field 'name': the run folder {run_dir!r} is a file, not a folder; choose "
                              f"another name or output_dir")
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise ConfigError(f"config field 'output_dir': the run folder {run_dir!r} is not writable (permissions "
                              f"or a read-only filesystem); set output_dir to a writable folder, e.g. "
                              f"--set output_dir=runs")
        return
    parent = os.path.dirname(os.path.abspath(run_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        reason = f"{parent!r} is a file, not a folder"
    elif not os.access(parent, os.W_OK | os.X_OK):
        reason = f"{parent!r} is not writable (permissions or a read-only filesystem)"
    else:
        return
    raise ConfigError(f"config field 'output_dir': {cfg.output_dir!r}{where(cfg.output_dir)} cannot hold the run "
                      f"folder {run_dir!r}: {reason}; set output_dir to a writable folder, e.g. "
                      f"--set output_dir=runs")


def check(cfg: RunConfig, resume, world_size: int = 1) -> None:
    """The checks a process can make alone, before any process group exists (the Trainer repeats
    what it needs): the batch plan for `world_size`, the run folder, the backbone path, the shard
    index against the config (its structure and listed files; checksums are the Trainer's), and a
    --resume path. ValueError (one line naming the field or file and the fix) on a mistake."""
    cfg.optim.batch_plan(world_size)
    check_output_dir(cfg)
    b = cfg.backbone
    if b.source == "pretrained" and b.path and not os.path.exists(b.path):
        raise missing_backbone_path(b)
    if b.source == "pretrained":  # the task-count limits of the stacked factors (limits.py)
        check_plan(cfg, pretrained_width(b.path))
    from sdlora_ds.data.index import ShardIndex
    from sdlora_ds.data.remote import ReadPolicy
    index = ShardIndex.load(cfg.data.index, verify_checksums=False, clues=[cfg.name],
                            shard_url=cfg.data.shard_url, policy=ReadPolicy.from_config(cfg.data))
    index.check_against(cfg.cil.num_classes, [cfg.data.train_split, cfg.data.test_split])
    if resume not in (None, "auto") and not os.path.isdir(resume):
        raise ValueError(f"--resume {resume!r}: no such checkpoint folder{where(resume)}; use --resume auto or "
                         f"the path of a folder under {os.path.join(cfg.run_dir, 'checkpoints')}/")


def load_and_check(args, world_size: int = 1) -> RunConfig:
    """The config of train.py's arguments (--config, --set, --resume, --dry-run), checked for
    `world_size` processes. With --dry-run: the dry run's config (sdlora_ds/dryrun.py)."""
    cfg = load_config(args.config, args.set)
    if getattr(args, "dry_run", False):
        from .dryrun import dry_run_config
        cfg = dry_run_config(cfg, world_size, args.dry_run_steps, args.dry_run_eval_images)
    check(cfg, args.resume, world_size)
    return cfg
