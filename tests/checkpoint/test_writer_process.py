"""The checkpoint writer's queue manager dies with a SIGKILLed training process, and a real save uses it.

Megatron's own manager (``mp.get_context("spawn").Manager()``) survives a SIGKILL of its parent; ours
must be gone within a bounded wait.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.dist import init_cpu_dist, run_ranks
from tests.training.helpers import Run, make_data

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")

KILLED_PARENT = """
import os, signal
from megatron_longvideo.checkpoint.writer import install_writer_queue, writer_manager_pid
from megatron.core.dist_checkpointing.strategies import filesystem_async

assert install_writer_queue()
queue = filesystem_async._results_queue
queue.put("ping")
assert queue.get(timeout=30) == "ping"  # the manager serves
print(writer_manager_pid(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _gone(pid: int) -> bool:
    """No such process, or only a zombie left (its parent is dead, so init reaps it)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next((line.split()[1] for line in f if line.startswith("State:")), "")
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"


def test_manager_dies_with_a_killed_parent():
    proc = subprocess.run([sys.executable, "-c", KILLED_PARENT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, f"the parent should have SIGKILLed itself: rc {proc.returncode}, {proc.stderr[-3000:]}"
    pid = int(proc.stdout.strip())
    deadline = time.monotonic() + 60
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not _gone(pid):
        os.kill(pid, 9)
        pytest.fail(f"the writer queue manager (pid {pid}) outlived its SIGKILLed parent by 60 s (killed it now)")


def _save_worker(rank, world_size, data, root):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_longvideo.checkpoint.dist_ckpt import close_checkpoint_writer
    from megatron_longvideo.checkpoint.writer import owns_writer_queue
    from megatron_longvideo.training.engine import OptimConfig

    init_cpu_dist()
    out = {}
    try:
        assert filesystem_async._results_queue is None
        run = Run({}, data)
        run.train(OptimConfig(lr=1e-2), train_iters=1, save=root)
        run.close()
        out["saved"] = sorted(os.listdir(root))
        out["ours"] = owns_writer_queue()
        process = filesystem_async._results_queue._manager._process
        out["alive_before_close"] = process.is_alive()
    finally:
        close_checkpoint_writer()
    out["queue_after_close"] = filesystem_async._results_queue
    process.join(30)
    out["alive_after_close"] = process.is_alive()
    return out


def test_save_uses_our_queue_and_close_stops_it(tmp_path):
    data = make_data(str(tmp_path / "data"))
    out = run_ranks(_save_worker, 1, data, str(tmp_path / "ckpt"), timeout=300)[0]
    assert "iter_0000001" in out["saved"], out
    assert out["ours"], "save_checkpoint should run megatron's writer with the queue install_writer_queue started"
    assert out["alive_before_close"]
    assert out["queue_after_close"] is None
    assert not out["alive_after_close"], "close_checkpoint_writer() should stop our manager"
