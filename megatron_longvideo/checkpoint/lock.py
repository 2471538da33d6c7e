"""One run per ``--save`` folder: an exclusive lock held for the life of the process.

Two runs writing the same ``--save`` folder corrupt each other quietly: both write ``iter_N.tmp``, rename
it, move the ``latest`` marker and prune the other's checkpoints. :func:`lock_save_folder` takes an
exclusive ``flock`` on ``<root>/.lock`` and keeps the file open until the process ends, so a second run
fails at start with one line naming the holder (pid, host, start time, command line).

Why ``flock`` and not a pid file: the kernel drops the lock when the last descriptor of the open file is
closed, which includes the process dying by SIGKILL or OOM kill, so there is never a stale lock to clean
up by hand. The holder's description in the file is only for the message; a description left by a
dead run is simply overwritten by the next one.

Caveats:

- ``flock`` on network file systems depends on the file system: NFSv4 (and Linux NFS clients since 2.6.12,
  which map it to POSIX locks) and Lustre mounted with ``flock`` support it; some (e.g. Lustre with
  ``noflock``, some FUSE file systems) reject it, in which case the run goes on without the lock and logs
  a warning; a few accept it but lock only per client machine.
- The descriptor is not inherited across ``exec`` (Python's default), but ``fork``-ed children
  (DataLoader workers with the ``fork`` start method) share it: the lock is released once they are gone too.
- In a distributed run only global rank 0 takes the lock (:func:`lock_save_folder_on_rank0`): one lock per
  run, not per rank, and every rank raises the same error when the folder is busy.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from typing import Optional

__all__ = ["LOCK_FILE", "SaveFolderBusy", "SaveFolderLock", "lock_save_folder", "lock_save_folder_on_rank0"]

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
"""The lock file's name inside the ``--save`` folder."""

_CMD_CHARS = 300
"""At most this many characters of the holder's command line go into the error message."""

_held: dict[str, "SaveFolderLock"] = {}
"""The locks this process holds, by the folder's real path (flock conflicts even within one process)."""


class SaveFolderBusy(RuntimeError):
    """Another live run holds the ``--save`` folder's lock. The message names that run."""


@dataclasses.dataclass
class SaveFolderLock:
    """A held lock on a ``--save`` folder; released by :meth:`release` or when the process ends."""

    root: str
    """The folder, as given."""
    path: str
    """The lock file."""
    fd: Optional[int]
    """The open lock file; None once released, or when the file system does not support ``flock``."""

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        """Drop the lock (idempotent). The description stays in the file; the next holder overwrites it."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)  # closing the only descriptor releases the flock
        key = _key(self.root)
        if _held.get(key) is self:
            del _held[key]


def _key(root: str) -> str:
    return os.path.realpath(root)


def _describe() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "argv": list(sys.argv),
    }


def _read_holder(path: str, tries: int = 20) -> Optional[dict]:
    """The holder's description, or None if unreadable. The holder writes it just after taking the lock:
    an empty file means we looked in between, so look again briefly."""
    for _ in range(tries):
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            return None
        if text.strip():
            try:
                holder = json.loads(text)
            except ValueError:
                return None
            return holder if isinstance(holder, dict) else None
        time.sleep(0.05)
    return None


def _busy_message(root: str, holder: Optional[dict]) -> str:
    if holder is None:
        who = "a process that did not record itself in " + os.path.join(root, LOCK_FILE)
    else:
        cmd = " ".join(shlex.quote(str(a)) for a in holder.get("argv") or []).replace("\n", " ")
        if len(cmd) > _CMD_CHARS:
            cmd = cmd[:_CMD_CHARS - 3] + "..."
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')} ({cmd})"
    return f"--save {root} is in use by another run: {who}; wait for it to finish or choose another --save"


def _write_holder(fd: int) -> None:
    data = (json.dumps(_describe()) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def lock_save_folder(root: str) -> SaveFolderLock:
    """Take the exclusive lock on ``root`` (created if needed) for this process, or raise :class:`SaveFolderBusy`.

    Calling it again for the same folder in the same process returns the lock already held.
    """
    key = _key(root)
    if key in _held and _held[key].held:
        return _held[key]
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the file may describe the current holder
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SaveFolderBusy(_busy_message(root, _read_holder(path))) from None
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        log.warning("--save %s: the file system does not support flock (%s); running without the save-folder "
                    "lock, so make sure no other run writes there", root, e.strerror)
        return SaveFolderLock(root, path, None)
    _write_holder(fd)
    lock = SaveFolderLock(root, path, fd)
    _held[key] = lock
    return lock


def lock_save_folder_on_rank0(root: str) -> Optional[SaveFolderLock]:
    """Collective: global rank 0 takes the lock on ``root``; every rank raises the same error if it cannot.

    Returns the lock on rank 0 and None on the other ranks. Without an initialised ``torch.distributed``
    (or with one rank) it is :func:`lock_save_folder`. A failure other than "busy" (e.g. no permission to
    create the folder) is re-raised on rank 0 and reported as a RuntimeError naming it on the others.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return lock_save_folder(root)
    lock, error, outcome = None, None, ["ok", ""]
    if dist.get_rank() == 0:
        try:
            lock = lock_save_folder(root)
        except SaveFolderBusy as e:
            error, outcome = e, ["busy", str(e)]
        except Exception as e:  # every rank waits in the broadcast below: tell them before raising
            error, outcome = e, ["error", f"{type(e).__name__}: {e}"]
    dist.broadcast_object_list(outcome, src=0)
    kind, message = outcome
    if error is not None:
        raise error
    if kind == "busy":
        raise SaveFolderBusy(message)
    if kind == "error":
        raise RuntimeError(f"--save {root}: rank 0 could not lock the folder: {message}")
    return lock
