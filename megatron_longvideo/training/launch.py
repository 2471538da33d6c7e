"""One clear error per run: the entry scripts' wrapper around ``main``.

A failure in a ``torchrun`` job of N ranks usually prints N interleaved tracebacks (plus megatron's and
TransformerEngine's import warnings), and the one line that says what went wrong is lost in them. Worse,
the ranks that did not fail are often stuck in a collective and never exit. :func:`run_script` turns that
into:

- each failing rank writes its full traceback to ``<log dir>/<name>.rank<R>.log``;
- only the first failing rank of the run prints one line to stderr: the exception, the first line of its
  message, a hint by exception type and the path of the traceback file;
- the process ends at once with status 1 (``os._exit``), so the launcher sees the failure and stops the rest.

"First" is decided without collectives (the other ranks may be stuck in one) by creating a claim file
atomically (``O_CREAT | O_EXCL``) in the log dir, named after the run (``$TORCHELASTIC_RUN_ID``, else
``$MASTER_PORT``, else the pid). Run ids repeat across runs (``torchrun`` without ``--standalone`` uses
``none``; the port is often the default 29500), so a claim older than this process is an earlier run's: the
claims are numbered, every rank skips those older than itself and races with O_EXCL for the first free
number. The log dir is ``$MLV_LOG_DIR``, else ``<--save>/logs``, else ``./logs``; it must be shared by all
nodes for "one line per run" to hold across nodes (``--save`` usually is), else it is one line per node.

:func:`quiet_warnings` drops the import-time warnings of megatron-core (TransformerEngine / Apex missing,
deprecated module paths) that say nothing to a user; each is named by category, message and module.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shlex
import socket
import sys
import tempfile
import time
import traceback
import warnings
from typing import Callable, Optional, Sequence

__all__ = ["run_script", "quiet_warnings", "log_dir"]

_IMPORTED = time.time()

_NOISE = (
    # (category, message regex (matched at the start), module regex (matched at the start))
    (UserWarning, r"Transformer Engine and Apex are not installed\.", r"(megatron\.core|megatron_fsdp)(\.|\Z)"),
    (UserWarning, r"Apex is not installed\.", r"megatron\.core(\.|\Z)"),
    (DeprecationWarning, r"The following imports from `dynamic_context\.py` will be removed",
     r"megatron\.core\.inference\.contexts\Z"),
    (DeprecationWarning, r"The 'megatron\.core\.transformer\.custom_layers\.transformer_engine'\s+module is deprecated",
     r"megatron\.core(\.|\Z)"),
    # torch.compile, called by megatron's fused kernels at import, imports torch.utils.mkldnn, which uses it
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated", r"torch\.jit\._script\Z"),
    # megatron's torch_dist checkpoints are ShardedTensor-based; torch's loader says so on every load
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor",
     r"torch\.distributed\.checkpoint(\.|\Z)"),
)
"""The warnings :func:`quiet_warnings` ignores, import-time and checkpoint-load noise (seen with megatron-core
0.16.1, torch 2.x)."""

_HINTS = (
    # (module, class name, hint); the first class the exception is an instance of wins (subclasses first)
    ("megatron_longvideo.checkpoint.lock", "SaveFolderBusy", None),
    ("megatron_longvideo.data.errors", "VideoDecodeError", "fix or remove that input, or pass --on-bad-input skip"),
    ("megatron_longvideo.data.errors", "RecordError", "fix or remove that input, or pass --on-bad-input skip"),
    ("megatron_longvideo.checkpoint.ckpt_files", "CheckpointError", "check --load / --save / --ref-load"),
    ("torch", "OutOfMemoryError", "lower --num-frames or --micro-batch-size, or raise --context-parallel-size"),
    ("builtins", "FileNotFoundError", "check the path"),
    ("builtins", "ValueError", "see --help for the flag"),
)
"""Looked up in ``sys.modules`` only: an exception of a class can only exist if its module was imported."""

_DEFAULT_HINT = "see the traceback"
_MAX_CLAIMS = 1000
"""Numbered claims tried per run id (one is left per failed run that reused the id)."""


def quiet_warnings() -> None:
    """Ignore megatron-core's import-time noise (see ``_NOISE``); call it before importing megatron."""
    for category, message, module in _NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


# --------------------------------------------------------------------------------------------- #
# where
# --------------------------------------------------------------------------------------------- #
def _flag_value(argv: Sequence[str], flag: str) -> Optional[str]:
    """The last value of ``flag`` (``--flag V`` or ``--flag=V``) in ``argv``, or None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return value


def _save_dir(argv: Sequence[str]) -> Optional[str]:
    save = _flag_value(argv, "--save")
    config = _flag_value(argv, "--config")
    if save is None and config:  # ``--config run.json`` may hold it
        try:
            with open(config) as f:
                values = json.load(f)
            save = values.get("save") if isinstance(values, dict) else None
        except (OSError, ValueError):
            save = None
    return save or None


def log_dir(argv: Optional[Sequence[str]] = None) -> str:
    """``$MLV_LOG_DIR``, else ``<--save>/logs`` (from ``argv``, default ``sys.argv[1:]``), else ``./logs``."""
    if os.environ.get("MLV_LOG_DIR"):
        return os.path.abspath(os.environ["MLV_LOG_DIR"])
    save = _save_dir(sys.argv[1:] if argv is None else list(argv))
    return os.path.abspath(os.path.join(save, "logs") if save else "logs")


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _run_id() -> str:
    run = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("MASTER_PORT") or f"pid{os.getpid()}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", run)


# --------------------------------------------------------------------------------------------- #
# who is first
# --------------------------------------------------------------------------------------------- #
def _process_start_time() -> float:
    """When this process started (wall clock), from /proc; the import time of this module elsewhere.

    /proc gives the start in clock ticks since boot (10 ms), rounded down: the end of that tick is
    returned, so that a claim written just before this process started (a rerun right after a failed run)
    counts as an earlier run's. A rank of this run cannot fail within 10 ms of another rank's start.
    """
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime (after "pid (comm)")
        tick = 1.0 / os.sysconf("SC_CLK_TCK")
        started = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + (ticks + 1) * tick
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED
    # a container may show its own uptime but the host's start ticks: then trust only the import time
    return started if _IMPORTED - 3600 < started <= _IMPORTED + 1 else _IMPORTED


def _claim_first(directory: str, name: str, rank: int) -> bool:
    """Whether this rank is the first of its run to fail (see the module docstring)."""
    started = _process_start_time()
    base = os.path.join(directory, f"{name}.{_run_id()}.first_error")
    for number in range(_MAX_CLAIMS):
        path = f"{base}.{number}"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                claimed = os.stat(path).st_mtime
            except FileNotFoundError:  # removed by hand meanwhile: the next number decides
                continue
            if claimed >= started:  # claimed after we started: a rank of this run was first
                return False
            continue  # an earlier run's
        with os.fdopen(fd, "w") as f:
            f.write(f"rank {rank} pid {os.getpid()} on {socket.gethostname()}\n")
        return True
    return True  # every number taken by earlier runs: rather two lines than none


# --------------------------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------------------------- #
def _hint(exc: BaseException) -> Optional[str]:
    for module, cls, hint in _HINTS:
        klass = getattr(sys.modules.get(module), cls, None)
        if isinstance(klass, type) and isinstance(exc, klass):
            return hint
    return _DEFAULT_HINT


def _summary(exc: BaseException) -> str:
    """``Type: first line (+K more lines)``."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    more = f" (+{len(lines) - 1} more lines)" if len(lines) > 1 else ""
    return f"{type(exc).__name__}: {lines[0]}{more}"


def _write_traceback(directory: str, name: str, rank: int, exc: BaseException) -> Optional[str]:
    """Write the full traceback to ``<directory>/<name>.rank<R>.log`` (the temp dir if that fails)."""
    header = (f"# {name} rank {rank} pid {os.getpid()} on {socket.gethostname()} at "
              f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}: "
              f"{' '.join(shlex.quote(a) for a in sys.argv)}\n")
    text = header + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    for where in (directory, os.path.join(tempfile.gettempdir(), "mlv_logs")):
        path = os.path.join(where, f"{name}.rank{rank}.log")
        try:
            os.makedirs(where, exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return None


def _report(exc: BaseException, name: str, argv) -> None:
    """Traceback file on every failing rank; one stderr line on the first one."""
    rank = _rank()
    directory = log_dir(argv)
    path = _write_traceback(directory, name, rank, exc)
    if path is None:  # nowhere to write: the traceback itself is the report
        traceback.print_exception(type(exc), exc, exc.__traceback__)
        return
    try:
        first = _claim_first(os.path.dirname(path), name, rank)
    except OSError:
        first = rank == 0
    if not first:
        return
    if isinstance(exc, KeyboardInterrupt):
        line = f"{name}: interrupted on rank {rank}. Traceback: {path}"
    else:
        hint = _hint(exc)
        line = f"{name}: error on rank {rank}: {_summary(exc)}{f' -- {hint}' if hint else ''}. Full traceback: {path}"
    print(line, file=sys.stderr, flush=True)


def _exit_now(code: int) -> None:
    """Flush and leave without the interpreter's shutdown.

    A rank whose peers are stuck in a collective has live gloo / NCCL threads (and megatron's helper
    processes): a normal exit joins threads and runs atexit hooks and finalizers that can wait on them
    forever, so the launcher never learns that the rank failed. ``os._exit`` ends the process at once.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    logging.shutdown()  # flushes and closes the log handlers (files opened by the run's logging setup)
    os._exit(code)


def run_script(main: Callable, argv: Optional[Sequence[str]] = None, *, name: str) -> int:
    """``main(argv)``; returns 0. On an exception: report it (see the module docstring) and exit with status 1
    (130 on Ctrl-C). ``SystemExit`` (argparse's ``--help`` and usage errors) passes through.

    Use as ``sys.exit(run_script(main, name="sft"))`` under ``if __name__ == "__main__":``.
    """
    quiet_warnings()
    try:
        main(argv)
    except SystemExit:
        raise
    except BaseException as exc:  # KeyboardInterrupt too: one line, not N tracebacks
        code = 130 if isinstance(exc, KeyboardInterrupt) else 1
        try:
            _report(exc, name, argv)
        except BaseException:  # the report itself failed: fall back to the plain traceback
            traceback.print_exception(type(exc), exc, exc.__traceback__)
        _exit_now(code)
    return 0
