"""Entry point: `python launch/run.py [--config_file launch/<topology>.yaml] launch/train.py
--config configs/<run>.json [--set key=value ...] [--resume auto|PATH]` (run.py is `accelerate
launch` with clean user errors; `accelerate launch` itself works the same way).

`--dry-run` checks a run before GPU hours are spent on it: the same config, launcher, model, data
and checkpoint code, but a couple of optimizer steps per task and a small evaluation sample (printed),
into the run folder <name>-dry-run (sdlora_ds/dryrun.py).

Parses arguments, checks the inputs, runs the Trainer. A user mistake (config, paths, data index,
resume) stops every process with exit code 2 and ONE line, `error: ...`, printed by the first
process of each node (sdlora_ds/errors.py: which errors are the user's, and the exit codes). The checks that need no other process (`check`) run
before the process group is created; the rest run in the Trainer, identically on every rank.
"""
import argparse
import os
import sys

import runtime  # noqa: E402  (launch/runtime.py)
from sdlora_ds import errors, threads  # noqa: E402
from sdlora_ds.preflight import check, check_output_dir, load_and_check  # noqa: E402,F401  (run.py, tests)


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
    parser.add_argument("--dry-run", action="store_true",
                        help="check the run before spending GPU hours on it: this config, launcher, model, data and "
                             "checkpoint code, but --dry-run-steps optimizer steps per task and a small evaluation "
                             "sample, into the run folder <name>-dry-run (sdlora_ds/dryrun.py)")
    parser.add_argument("--dry-run-steps", type=int, default=2, metavar="N", help="--dry-run: optimizer steps per task")
    parser.add_argument("--dry-run-eval-images", type=int, default=64, metavar="N",
                        help="--dry-run: test images per evaluation (about; one batch per rank)")
    plan = parser.add_argument_group("memory plan (sdlora_ds/plan.py): print per-GPU memory and exit, loading nothing")
    plan.add_argument("--plan", action="store_true",
                      help="print the per-GPU bytes of frozen parameters, adapters, gradients, optimizer states and "
                           "activations, the total against --gpu-mem, and what to change if it does not fit")
    plan.add_argument("--num_processes", type=int, default=None, metavar="N",
                      help="--plan: GPUs (default: WORLD_SIZE, else 1)")
    plan.add_argument("--gpu-mem", type=float, default=80.0, metavar="GiB", help="--plan: memory of one GPU")
    plan.add_argument("--zero-stage", type=int, default=3, choices=(0, 2, 3),
                      help="--plan: 0 = no DeepSpeed (accelerate_1gpu.yaml), 2 or 3 (accelerate_zero2/3.yaml)")
    plan.add_argument("--offload", action="store_true",
                      help="--plan: ZeRO-3 with parameters and optimizer on CPU (accelerate_zero3_offload.yaml)")
    return parser.parse_args(argv)


def print_plan(args) -> int:
    """--plan: the config's memory plan; nothing is loaded (no weights, no data, no process group)."""
    from sdlora_ds.config import load_config
    from sdlora_ds.plan import Setting, format_plan, make_plan
    try:
        n = args.num_processes or int(os.environ.get("WORLD_SIZE", "1"))
        if n < 1 or args.gpu_mem <= 0:
            raise ValueError(f"--num_processes {n} / --gpu-mem {args.gpu_mem}: both must be > 0")
        if args.offload and args.zero_stage != 3:
            raise ValueError("--offload plans ZeRO-3 parameter offload: use it with --zero-stage 3")
        cfg = load_config(args.config, args.set)
        print(format_plan(make_plan(cfg, Setting(n, args.gpu_mem, args.zero_stage, args.offload))), flush=True)
    except ValueError as e:
        return errors.report_error(e)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plan:
        return print_plan(args)
    try:
        cfg = load_and_check(args, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as e:  # user mistakes: one line naming the field/file and the fix
        return errors.report_error(e)
    if args.dry_run:
        from sdlora_ds.config import load_config
        from sdlora_ds.dryrun import describe, is_first_process
        if is_first_process():
            print(describe(load_config(args.config, args.set), cfg, int(os.environ.get("WORLD_SIZE", "1"))), flush=True)
    if "OMP_NUM_THREADS" not in os.environ:  # no launcher: a share of this machine (sdlora_ds/threads.py)
        threads.set_cpu_threads(threads.local_world_size())
    runtime.deepspeed_build_note()
    from sdlora_ds.distributed import resolve_deepspeed_config_file
    resolve_deepspeed_config_file(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # launch/*.yaml
    from sdlora_ds.trainer import Trainer
    try:
        trainer = Trainer(cfg, resume=args.resume, fresh_if_damaged=args.fresh_if_damaged)
    except ValueError as e:  # raised on every rank alike (rank 0 decides what to resume and broadcasts)
        return errors.report_error(e)
    try:
        trainer.run()
    except Exception as e:  # one process (several: PeerMonitor.abort reports it per rank)
        kind = errors.training_user_error(e)
        if kind is None:
            raise  # a bug: its traceback
        # bad data: the checkpoints are untouched; a failed kernel self-check: the fix is adapter.impl
        hint = errors.resume_hint(os.path.join(cfg.run_dir, "checkpoints")) if kind == "data" else ""
        return errors.report_error(e, hint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
