"""fileio: atomic file and folder writes. A child process is killed (os._exit) after each step of a
folder replacement; the folder then holds the old content or the new, never nothing, once
`recover` (which readers and the next write call) has run."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from sdlora_ds import fileio

_CHILD = textwrap.dedent("""
    import os, sys
    from sdlora_ds import fileio
    path, kill_at = sys.argv[1], int(sys.argv[2])

    def hook(k):
        if k == kill_at:
            os._exit(17)
    fileio._step_hook = hook

    def write(tmp):
        os.makedirs(tmp)
        with open(os.path.join(tmp, "v.txt"), "w") as f:
            f.write("new")
    fileio.atomic_write(path, write)
""")


def _folder(path, value):
    os.makedirs(path)
    with open(os.path.join(path, "v.txt"), "w") as f:
        f.write(value)


def _read(path):
    with open(os.path.join(path, "v.txt")) as f:
        return f.read()


def _killed_write(path, kill_at):
    r = subprocess.run([sys.executable, "-c", _CHILD, path, str(kill_at)], timeout=300)
    assert r.returncode == 17  # killed at that step, not finished or crashed


@pytest.mark.parametrize("kill_at,expect", [(1, "old"), (2, "old"), (3, "new")])
def test_folder_replacement_killed_after_each_step_leaves_old_or_new(tmp_path, kill_at, expect):
    path = str(tmp_path / "model")
    _folder(path, "old")
    _killed_write(path, kill_at)
    if kill_at == 2:
        assert not os.path.exists(path)  # the kill left the old folder aside: the reader recovers it
    fileio.recover(path)
    assert _read(path) == expect
    left = sorted(n for n in os.listdir(tmp_path) if fileio.ASIDE in n)
    assert left == []  # recover removed or restored every aside of the dead writer


@pytest.mark.parametrize("kill_at", [1, 2, 3])
def test_next_write_after_a_kill_recovers_and_replaces(tmp_path, kill_at):
    path = str(tmp_path / "model")
    _folder(path, "old")
    _killed_write(path, kill_at)

    def write(tmp):
        _folder(tmp, "third")
    fileio.atomic_write(path, write)
    assert _read(path) == "third"
    assert [n for n in os.listdir(tmp_path) if fileio.ASIDE in n] == []


def test_failed_folder_write_keeps_the_old_folder(tmp_path):
    path = str(tmp_path / "model")
    _folder(path, "old")

    def write(tmp):
        _folder(tmp, "new")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        fileio.atomic_write(path, write)
    assert _read(path) == "old"
    assert os.listdir(tmp_path) == ["model"]


def test_failed_rename_in_puts_the_old_folder_back(tmp_path, monkeypatch):
    path = str(tmp_path / "model")
    _folder(path, "old")

    def fail(k):
        if k == 2:
            raise OSError("rename failed")
    monkeypatch.setattr(fileio, "_step_hook", fail)
    with pytest.raises(OSError):
        fileio.atomic_write(path, lambda tmp: _folder(tmp, "new"))
    assert _read(path) == "old"
    assert os.listdir(tmp_path) == ["model"]


def test_aside_of_a_live_writer_is_left_alone(tmp_path):
    path = str(tmp_path / "model")
    _folder(path, "new")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        _folder(f"{path}{fileio.ASIDE}{live.pid}", "old")
        fileio.recover(path)
        assert os.path.isdir(f"{path}{fileio.ASIDE}{live.pid}")
    finally:
        live.kill()
        live.wait(timeout=300)
    fileio.recover(path)
    assert os.listdir(tmp_path) == ["model"]


def test_file_writes_with_fsync(tmp_path):
    path = str(tmp_path / "x.json")
    fileio.atomic_write_json(path, {"a": 1}, newline=True, fsync=True)
    fileio.atomic_write_json(path, {"a": 2}, newline=True, fsync=True)
    with open(path) as f:
        assert json.load(f) == {"a": 2}
    assert os.listdir(tmp_path) == ["x.json"]


def test_shard_index_json_is_fsynced(tmp_path, monkeypatch):
    """shards.writer promises the index and state files are flushed like the shards."""
    from shards import writer
    synced = []
    real = fileio.fsync_path
    monkeypatch.setattr(fileio, "fsync_path", lambda p: (synced.append(p), real(p)))
    writer.atomic_write_json(str(tmp_path / "index.json"), {"k": 1})
    assert any(p.endswith(".tmp%d" % os.getpid()) for p in synced)  # the file, before its rename
    assert str(tmp_path) in synced  # the folder, after it
