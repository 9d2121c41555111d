"""`accelerate launch` with clean user errors and a sane CPU thread count:

    python launch/run.py [accelerate launch arguments] launch/train.py --config configs/<run>.json [...]

It takes exactly the arguments of `accelerate launch` and calls accelerate's own launcher in this
process, with three additions:

1. Before any worker starts, the checks train.py makes before training (config, batch plan for the
   launch's world size, output_dir, backbone path, data index, --resume path) run here; a mistake
   stops the launch with one `error: ...` line and exit code 2.
2. A worker that stops on a user mistake after the workers started (exit code 2: it printed its
   one line, on rank 0) ends this launcher with exit code 2 and nothing more: no launcher
   traceback, no "ChildFailedError" report. Every other failure is reported as accelerate does.
   (`accelerate launch -q` does not do this: with the launch/ configs accelerate uses torchrun's
   launcher, which -q does not silence, and it exits 1.)
3. Unless OMP_NUM_THREADS or --num_cpu_threads_per_process is given, each process gets usable
   CPUs / processes per machine threads (accelerate's default with the launch/ CPU configs is 1),
   whatever the machine's load; a resumed run goes back to the count its checkpoint records.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys

from sdlora_ds import errors, threads

LAUNCH = os.path.dirname(os.path.abspath(__file__))

TRAIN = os.path.join(LAUNCH, "train.py")
_ELASTIC_LOGGER = "torch.distributed.elastic.multiprocessing.api"


class _HoldShutdownLogs(logging.Filter):
    """Holds torchrun's shutdown messages ('Sending process N closing signal SIGTERM', 'failed
    (exitcode: 2) ...') until the launch's outcome is known: dropped after a user error (the worker
    said everything in its error line), replayed otherwise."""

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []
        self.passing = False

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if self.passing or not (msg.startswith("failed (exitcode") or "closing signal" in msg):
            return True
        self.held.append(record)
        return False

    def release(self, logger: logging.Logger) -> None:
        self.passing = True
        for record in self.held:
            logger.handle(record)
        self.held = []


def _topology(args) -> tuple[int, int]:
    """(processes in all, machines) as accelerate will resolve them: the command line, else the
    config file, else 1."""
    procs, machines = args.num_processes, args.num_machines
    if procs is None or machines is None:
        try:
            from accelerate.commands.config import load_config_from_file
            cfg = load_config_from_file(args.config_file)
            procs = procs if procs is not None else getattr(cfg, "num_processes", None)
            machines = machines if machines is not None else getattr(cfg, "num_machines", None)
        except (OSError, ValueError, TypeError):
            pass  # accelerate reports a bad config file itself
    return max(1, procs or 1), max(1, machines or 1)


def check_training_inputs(args) -> int:
    """0, or the exit code after a user mistake in the training script's arguments or inputs."""
    if os.path.abspath(args.training_script) != TRAIN:
        return 0  # another script: nothing known to check
    import train
    procs, _ = _topology(args)
    targs = train.parse_args(args.training_script_args)  # a usage error exits 2 here, argparse-style
    try:
        train.load_and_check(targs, world_size=procs)
    except ValueError as e:
        return errors.report_error(e)
    return 0


def _failure_code(e: BaseException):
    """The exit code a worker failed with, when the launcher reports one."""
    if isinstance(e, subprocess.CalledProcessError):
        return e.returncode
    get_first = getattr(e, "get_first_failure", None)  # torchrun's ChildFailedError
    if get_first is not None:
        return get_first()[1].exitcode
    return None


def main(argv=None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    args = launch_command_parser().parse_args(argv)
    if args.config_file and not os.path.isfile(args.config_file):
        return errors.report_error(ValueError(f"--config_file {args.config_file!r} does not exist; use one of "
                                              f"launch/accelerate_*.yaml (run from the repository root)"))
    code = check_training_inputs(args)
    if code:
        return code
    if "OMP_NUM_THREADS" not in os.environ and args.num_cpu_threads_per_process is None:
        procs, machines = _topology(args)
        os.environ["OMP_NUM_THREADS"] = str(threads.cpu_threads(max(1, procs // machines))[0])
        os.environ[threads.THREADS_SOURCE_ENV] = "auto"  # chosen here, not forced: a resume may replace it
    else:
        os.environ[threads.THREADS_SOURCE_ENV] = "user"
    logger = logging.getLogger(_ELASTIC_LOGGER)
    hold = _HoldShutdownLogs()
    logger.addFilter(hold)
    try:
        launch_command(args)
    except Exception as e:
        if _failure_code(e) == errors.EXIT_USER:  # a user mistake: the worker printed its one error line
            return errors.EXIT_USER
        hold.release(logger)
        raise
    finally:
        logger.removeFilter(hold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
