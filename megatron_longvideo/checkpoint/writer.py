"""No orphaned checkpoint-writer processes: megatron's results-queue manager dies with the training process.

Megatron's torch_dist writer (``filesystem_async.FileSystemWriterAsync``, used by sync and async saves)
collects the write results through a queue that lives in a ``multiprocessing`` manager process, started
on the first save (``_get_write_results_queue``: ``mp.get_context("spawn").Manager().Queue()``, kept in the
module global ``_results_queue``). That manager is stopped by an ``atexit``-style finalizer, which never
runs when the training process is SIGKILLed (OOM killer, scheduler preemption, ``kill -9`` of a hung
rank): the manager, a spawned interpreter of ~270 MB (it re-imports the training script's main module),
stays behind under init, one per rank and per killed run.

:func:`install_writer_queue` creates that manager first, in the same way, with an initializer that asks
Linux to SIGKILL the manager when its parent dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``), and then
checks that the parent is still the one that started it (the parent may have died before ``prctl`` ran:
then the manager exits at once). Megatron then finds ``_results_queue`` set and uses ours. The queue
proxy keeps its manager in ``_manager``, so ``dist_ckpt.close_checkpoint_writer`` stops it as before.

Why there is no ``find_orphaned_writers``: with the death signal the kernel itself ends the manager when
the training process ends, however it ends, so there is nothing to find. Searching ``/proc`` for
managers of dead runs would need a reliable way to tell them from other ``multiprocessing`` servers
(they all run ``multiprocessing.spawn``), which there is not.

Limits: ``PR_SET_PDEATHSIG`` fires when the *thread* that started the child ends, so the manager is only
started this way from the main thread (elsewhere megatron starts its own); on other systems than Linux
megatron's own behaviour is kept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import weakref

__all__ = ["install_writer_queue", "owns_writer_queue", "writer_manager_pid"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
"""From ``<linux/prctl.h>``."""

_installed = None
"""Weak reference to the queue proxy :func:`install_writer_queue` last installed."""


def _die_with_parent(parent_pid: int) -> None:
    """Manager initializer (runs in the manager process): SIGKILL this process when its parent dies."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not fatal: the manager then behaves as megatron's own
    if os.getppid() != parent_pid:  # the parent died before prctl: nobody would ever stop us
        os._exit(0)


def _supported() -> bool:
    return sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()


def install_writer_queue() -> bool:
    """Start megatron's checkpoint-writer results queue in a manager that dies with this process.

    Does nothing when a queue is already installed (ours or megatron's) or off Linux / off the main
    thread (megatron then starts its own at the first save). Returns whether it started one.
    """
    global _installed
    from multiprocessing import get_context
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None or not _supported():
        return False
    manager = SyncManager(ctx=get_context("spawn"))  # what ``ctx.Manager()`` builds, but with an initializer
    manager.start(_die_with_parent, (os.getpid(),))
    queue = manager.Queue()
    if getattr(queue, "_manager", None) is not manager:  # close_checkpoint_writer() relies on it
        manager.shutdown()
        raise RuntimeError("install_writer_queue: the multiprocessing queue proxy does not keep its manager in "
                           "_manager; close_checkpoint_writer() could not stop it")
    filesystem_async._results_queue = queue
    _installed = weakref.ref(queue)
    log.debug("checkpoint writer queue manager started: pid %d", manager._process.pid)
    return True


def owns_writer_queue() -> bool:
    """Whether megatron's current results queue is the one :func:`install_writer_queue` started."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    queue = filesystem_async._results_queue
    return queue is not None and _installed is not None and _installed() is queue


def writer_manager_pid():
    """The pid of the installed results-queue manager process, or None when there is none."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    manager = getattr(filesystem_async._results_queue, "_manager", None)
    process = getattr(manager, "_process", None)
    return getattr(process, "pid", None)
