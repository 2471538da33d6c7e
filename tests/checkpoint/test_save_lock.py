"""The ``--save`` folder lock: a second run is refused with a message naming the first, and the lock goes
away with the process that held it (no stale lock after the holder exits)."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys

import pytest

from megatron_longvideo.checkpoint.lock import (
    LOCK_FILE,
    SaveFolderBusy,
    lock_save_folder,
    lock_save_folder_on_rank0,
)
from tests.dist import init_cpu_dist, run_ranks

HOLDER = """
import sys
from megatron_longvideo.checkpoint.lock import lock_save_folder
lock_save_folder(sys.argv[1])
print("ready", flush=True)
sys.stdin.read()
"""


def _read_line(proc: subprocess.Popen, timeout: float = 60.0) -> str:
    """The subprocess's next stdout line, or a failure (with its stderr) after ``timeout`` seconds."""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            proc.kill()
            pytest.fail(f"the lock holder printed nothing in {timeout:.0f}s; stderr: {proc.communicate()[1]}")
    line = proc.stdout.readline()
    if not line:
        pytest.fail(f"the lock holder exited with {proc.wait()}; stderr: {proc.stderr.read()}")
    return line.strip()


@pytest.fixture
def holder(tmp_path):
    """A subprocess that holds the lock on ``tmp_path / 'save'`` until its stdin is closed."""
    root = str(tmp_path / "save")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, root, "--marker-flag"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _read_line(proc) == "ready"
        yield proc, root
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()


def test_second_run_is_refused_until_the_first_exits(holder):
    proc, root = holder
    with pytest.raises(SaveFolderBusy) as info:
        lock_save_folder(root)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"--save {root} is in use by another run: pid {proc.pid} on "), message
    assert "--marker-flag" in message, f"the holder's command line should be named: {message}"
    assert message.endswith("wait for it to finish or choose another --save"), message

    proc.stdin.close()  # the holder returns from stdin.read() and exits
    assert proc.wait(timeout=60) == 0
    lock = lock_save_folder(root)
    try:
        assert lock.held
        assert str(os.getpid()) in open(os.path.join(root, LOCK_FILE)).read()
    finally:
        lock.release()


def test_lock_dies_with_a_killed_holder(holder):
    proc, root = holder
    proc.kill()  # SIGKILL: no cleanup code runs in the holder
    proc.wait(timeout=60)
    lock = lock_save_folder(root)
    lock.release()


def test_reacquire_is_idempotent_and_release_frees(tmp_path):
    root = str(tmp_path / "new" / "save")  # created on demand
    first = lock_save_folder(root)
    try:
        assert lock_save_folder(root) is first
        assert lock_save_folder(root + "/") is first
        assert lock_save_folder_on_rank0(root) is first  # no torch.distributed: the plain lock
    finally:
        first.release()
    first.release()  # twice is fine
    again = lock_save_folder(root)
    assert again is not first and again.held
    again.release()


def _rank0_lock_worker(rank, world_size, root):
    init_cpu_dist()
    try:
        lock_save_folder_on_rank0(root)
    except SaveFolderBusy as e:
        return str(e)
    return None


def test_every_rank_raises_the_same_busy_error(tmp_path):
    root = str(tmp_path / "save")
    lock = lock_save_folder(root)  # this (pytest) process is the other run
    try:
        messages = run_ranks(_rank0_lock_worker, 2, root, timeout=120)
    finally:
        lock.release()
    assert messages[0] is not None and f"pid {os.getpid()} " in messages[0], messages
    assert messages[0] == messages[1], messages
