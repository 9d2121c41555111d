"""Entry point: `python launch/run.py [--config_file launch/<topology>.yaml] launch/train.py
--config configs/<run>.json [--set key=value ...] [--resume auto|PATH]` (run.py is `accelerate
launch` with clean user errors; `accelerate launch` itself works the same way).

Parses arguments, checks the inputs, runs the Trainer. A user mistake (config, paths, data index,
resume) stops every process with exit code 2 and ONE line, `error: ...`, printed by the first
process of each node (runtime.report_error). The checks that need no other process (`check`) run
before the process group is created; the rest run in the Trainer, identically on every rank.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import runtime  # noqa: E402  (launch/runtime.py)
from sdlora_ds.config import ConfigError, RunConfig, load_config  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch/train.py", description="SD-LoRA class-incremental training")
    parser.add_argument("--config", required=True, help="JSON run config (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, e.g. --set optim.lr=0.005 (repeatable; VALUE is JSON)")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue a run: 'auto' = the newest complete checkpoint of the run folder (a fresh "
                             "start if there is none), or a checkpoint folder (runs/NAME/checkpoints/step-...). "
                             "Without it, a run folder that already holds checkpoints is refused.")
    parser.add_argument("--fresh-if-damaged", action="store_true",
                        help="with --resume auto: if every checkpoint of the run folder is damaged, set them aside "
                             "(checkpoints/.damaged-*) and start the run over, logs included (without it: exit 2)")
    return parser.parse_args(argv)


def _where(path: str) -> str:
    return "" if os.path.isabs(path) else f" (relative to the current directory {os.getcwd()!r})"


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
    raise ConfigError(f"config field 'output_dir': {cfg.output_dir!r}{_where(cfg.output_dir)} cannot hold the run "
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
        raise ConfigError(f"config field 'backbone.path': {b.path!r} does not exist{_where(b.path)}; point it at a "
                          f"local transformers folder or .safetensors file (nothing is downloaded; for the demo run "
                          f"`python launch/pretrain_demo_backbone.py` first)")
    from sdlora_ds.data.index import ShardIndex
    index = ShardIndex.load(cfg.data.index, verify_checksums=False, clues=[cfg.name])
    index.check_against(cfg.cil.num_classes, [cfg.data.train_split, cfg.data.test_split])
    if resume not in (None, "auto") and not os.path.isdir(resume):
        raise ValueError(f"--resume {resume!r}: no such checkpoint folder{_where(resume)}; use --resume auto or "
                         f"the path of a folder under {os.path.join(cfg.run_dir, 'checkpoints')}/")


def load_and_check(args: argparse.Namespace, world_size: int = 1) -> RunConfig:
    cfg = load_config(args.config, args.set)
    check(cfg, args.resume, world_size)
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_and_check(args, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as e:  # user mistakes: one line naming the field/file and the fix
        return runtime.report_error(e)
    if "OMP_NUM_THREADS" not in os.environ:  # no launcher: a share of this machine (see runtime.py)
        runtime.set_cpu_threads(runtime.local_world_size())
    runtime.deepspeed_build_note()
    from sdlora_ds.trainer import Trainer
    try:
        trainer = Trainer(cfg, resume=args.resume, fresh_if_damaged=args.fresh_if_damaged)
    except ValueError as e:  # raised on every rank alike (rank 0 decides what to resume and broadcasts)
        return runtime.report_error(e)
    from sdlora_ds.kernels.selfcheck import KernelSelfCheckError
    try:
        trainer.run()
    except KernelSelfCheckError as e:  # the Triton path disagrees with the reference: one line, the fix
        return runtime.report_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
