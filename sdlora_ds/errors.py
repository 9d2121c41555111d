"""The error policy, defined once: which failures are the user's to fix and how each ends a process.

A user error ends the process with ONE line, `error: ...` (the message names the field, file or
shard and the fix), no traceback, and exit code EXIT_USER. They are:
- mistakes in the config, the paths, the data index, a checkpoint, the environment: ValueError
  and its subclasses (ConfigError, CheckpointError, RunLockError, ShardOpenError, BadSample,
  SourceMissing, NotDinov2Error, ...), raised before or at the start of training;
- bad data met during training: sdlora_ds.data.reader.BadDataError (one rank's share of samples);
- a failed kernel self-check: sdlora_ds.kernels.selfcheck.KernelSelfCheckError (the fix is
  adapter.impl).
Anything else is a bug and keeps its traceback. A rank that stops because of another (a dead peer,
a dead launcher, or a crash reported by PeerMonitor.abort) exits with EXIT_STOPPED; Ctrl-C in a
command-line tool with EXIT_INTERRUPTED.

Standard library only: the shard converters and their pool workers import it without torch.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Optional

EXIT_USER = 2
EXIT_STOPPED = 3
EXIT_INTERRUPTED = 130


class ConfigError(ValueError):
    """A user mistake in a config file or override (a ValueError, as every user error here)."""

_DURING_TRAINING = (("sdlora_ds.data.reader", "BadDataError"),
                    ("sdlora_ds.kernels.selfcheck", "KernelSelfCheckError"))


def training_user_error(e: BaseException) -> Optional[str]:
    """'data' (BadDataError) or 'kernel' (KernelSelfCheckError) for the user errors met during
    training, else None. Looked up in sys.modules: an exception of a class can only exist once its
    module is imported, and this module stays free of torch."""
    for kind, (module, name) in zip(("data", "kernel"), _DURING_TRAINING):
        mod = sys.modules.get(module)
        if mod is not None and isinstance(e, getattr(mod, name)):
            return kind
    return None


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, ValueError) or training_user_error(e) is not None


def message(e: BaseException, hint: str = "") -> str:
    """The error's text as one sentence, plus `hint` (e.g. how to resume) when given."""
    text = str(e)
    return f"{text.rstrip('. ')}. {hint}" if hint else text


def resume_hint(checkpoints: str) -> str:
    """What to do after a failure that left the checkpoints in `checkpoints` usable."""
    return f"Resume with --resume auto (checkpoints: {checkpoints})."


def without_traceback(e: BaseException) -> BaseException:
    """Drop `e`'s traceback before its error line is printed: the frames it holds keep the progress
    bar of the interrupted loop open, and a bar freed with them clears its line (tqdm, leave=False),
    so the error line starts at the beginning of a line instead of after a half-drawn bar."""
    e.__traceback__ = None
    return e


# ------------------------------------------------------------------ one process of a launch
def is_reporting_process() -> bool:
    """True in the process that prints user errors: local rank 0 (or no launcher at all)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


ERROR_GRACE_S = 20.0
"""How long another process waits before speaking for itself (see report_error)."""


def report_error(e: BaseException, hint: str = "") -> int:
    """Print `error: <message>` on the reporting process; returns EXIT_USER.

    Every process meets the same mistake (same config, same files), so the others stay silent. But
    a silent process must not exit first: the launcher would stop the reporting one before it
    printed. So the others wait; normally the reporting process exits meanwhile and the launcher
    stops them. A process whose mistake is its own (e.g. a file missing on one node only) prints
    it after ERROR_GRACE_S, with its rank."""
    text = message(without_traceback(e), hint)
    if is_reporting_process():
        print(f"error: {text}", file=sys.stderr, flush=True)
        return EXIT_USER
    time.sleep(ERROR_GRACE_S)
    print(f"error (rank {os.environ.get('RANK', '?')}): {text}", file=sys.stderr, flush=True)
    return EXIT_USER


def rank_error_line(rank: int, e: BaseException, hint: str = "") -> str:
    """A user error met by one rank alone (its share of the data): printed by that rank at once."""
    return f"error (rank {rank}): {str(e).rstrip('. ')}." + (f" {hint}" if hint else "")


# ------------------------------------------------------------------ command-line tools
def run_cli(main: Callable[..., Any], *args, interrupted: str = "interrupted") -> int:
    """Run a command-line tool's main(*args): a user error becomes one `error: ...` line on stderr
    and EXIT_USER; Ctrl-C prints `interrupted` and gives EXIT_INTERRUPTED; a bug propagates with
    its traceback. Otherwise main's exit code (an int), or 0."""
    try:
        code = main(*args)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if not is_user_error(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER
    return code if isinstance(code, int) else 0
