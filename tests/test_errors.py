"""sdlora_ds/errors.py: which errors are the user's, their lines and exit codes, run_cli."""
import subprocess
import sys

import pytest

from sdlora_ds import errors


def test_run_cli_user_error_is_one_line_and_exit_2(capsys):
    def main(x):
        raise ValueError(f"config field 'optim.lr': {x}; set it > 0")
    assert errors.run_cli(main, -1) == errors.EXIT_USER == 2
    assert capsys.readouterr().err == "error: config field 'optim.lr': -1; set it > 0\n"


def test_run_cli_passes_codes_through_and_bugs_keep_their_traceback(capsys):
    assert errors.run_cli(lambda: 1) == 1
    assert errors.run_cli(lambda: None) == 0
    with pytest.raises(KeyError):
        errors.run_cli(lambda: {}["x"])
    def interrupted():
        raise KeyboardInterrupt
    assert errors.run_cli(interrupted, interrupted="interrupted: kept what was done") == errors.EXIT_INTERRUPTED
    assert capsys.readouterr().err == "interrupted: kept what was done\n"


def test_training_user_errors_are_known_by_class():
    from sdlora_ds.data.reader import BadDataError
    from sdlora_ds.kernels.selfcheck import KernelSelfCheckError
    assert errors.training_user_error(BadDataError("x")) == "data"
    assert errors.training_user_error(KernelSelfCheckError("x")) == "kernel"
    assert errors.training_user_error(RuntimeError("x")) is None
    assert errors.is_user_error(ValueError("x")) and errors.is_user_error(BadDataError("x"))
    assert not errors.is_user_error(RuntimeError("x"))


def test_the_policy_module_does_not_import_torch():
    """The shard converters (and their pool workers) use it without torch."""
    code = "import sys; from sdlora_ds import errors; from shards import writer; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "False", out.stderr


def test_report_error_lines(capsys, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert errors.report_error(ValueError("bad shard 'a.tar'."), errors.resume_hint("runs/x/checkpoints")) == 2
    assert capsys.readouterr().err == ("error: bad shard 'a.tar'. Resume with --resume auto "
                                       "(checkpoints: runs/x/checkpoints).\n")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setattr(errors, "ERROR_GRACE_S", 0.0)
    assert errors.report_error(ValueError("missing file")) == 2
    assert capsys.readouterr().err == "error (rank 3): missing file\n"
    assert errors.rank_error_line(1, ValueError("bad key.")) == "error (rank 1): bad key."
    assert errors.rank_error_line(1, ValueError("bad key"), "Resume.") == "error (rank 1): bad key. Resume."
