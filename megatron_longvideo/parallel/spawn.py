"""Spawn N local ranks on this machine and collect what each returns (tests, benchmarks, demos).

``run_ranks(fn, world_size, *args)`` starts ``world_size`` fresh processes, each with RANK,
WORLD_SIZE, MASTER_ADDR and a free MASTER_PORT set, calls ``fn(rank, world_size, *args)`` there and
returns the list of per-rank return values (saved with torch.save to result files). When a rank
fails or the run times out, the other ranks are killed and an AssertionError carries each failing
rank's traceback and the tail of its output. ``fn`` must be a module-level function (spawn pickles it by
name).

Processes come from a fork server that has imported torch, megatron-core and transformers once
(``multiprocessing``'s ``forkserver`` with a preload): a rank starts in about a second instead of paying
those imports again (5-15 s each on a loaded 2-core machine). Each rank takes the caller's environment
and working directory as they are at the call. ``MLV_SPAWN_METHOD=spawn`` starts plain fresh interpreters
instead.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import sys
import tempfile
import time
import traceback

import torch

__all__ = ["run_ranks", "init_cpu_dist"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PRELOAD = ("torch", "torch.distributed", "numpy", "megatron.core", "megatron.core.models.gpt",
            "megatron.core.transformer.transformer_layer", "megatron.core.optimizer", "transformers")
"""What the fork server imports once for every rank it starts."""


def _context():
    method = os.environ.get("MLV_SPAWN_METHOD") or ("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    if method not in ("forkserver", "spawn"):
        raise ValueError(f"MLV_SPAWN_METHOD: 'forkserver' or 'spawn', got {method!r}")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(list(_PRELOAD))  # takes effect when the server starts (the first call)
    return ctx


def _child(fn, rank, world_size, port, workdir, args, env=None, cwd=None):
    if env is not None:  # a fork server's child has the server's environment: take the caller's
        os.environ.clear()
        os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    log = open(os.path.join(workdir, f"rank{rank}.log"), "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(workdir, f"rank{rank}.pt"))
        _close_checkpoint_writer()
        open(os.path.join(workdir, f"rank{rank}.done"), "w").close()
        if rank == 0:
            # rank 0 hosts the TCP store: leaving while a peer still creates groups or meets at a
            # barrier resets that peer's connection, so stay until every peer is done or failed
            _wait_for_peers(workdir, world_size)
    except BaseException:
        with open(os.path.join(workdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        log.flush()
        os._exit(1)
    log.flush()
    os._exit(0)


def _wait_for_peers(workdir: str, world_size: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    pending = set(range(1, world_size))
    while pending and time.monotonic() < deadline:
        pending = {
            r for r in pending
            if not os.path.exists(os.path.join(workdir, f"rank{r}.done"))
            and not os.path.exists(os.path.join(workdir, f"rank{r}.err"))
        }
        if pending:
            time.sleep(0.02)


def _close_checkpoint_writer():
    # megatron's checkpoint writer starts a helper process at the first save; os._exit below would
    # leave it running
    import sys as _sys

    if "megatron_longvideo.checkpoint.dist_ckpt" in _sys.modules:
        _sys.modules["megatron_longvideo.checkpoint.dist_ckpt"].close_checkpoint_writer()


def _tail(path: str, n: int = 40) -> str:
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        lines = [l for l in f.read().splitlines() if "UserWarning" not in l and "warnings.warn" not in l]
    return "\n".join(lines[-n:])


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; return their results."""
    ctx = _context()
    port = _free_port()
    env, cwd = dict(os.environ), os.getcwd()
    with tempfile.TemporaryDirectory(prefix="mlv_dist_") as workdir:
        procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, workdir, args, env, cwd))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        failed = None
        while any(p.is_alive() for p in procs):
            if any(p.exitcode not in (None, 0) for p in procs):
                failed = "a rank failed"
                break
            if time.monotonic() > deadline:
                failed = f"timed out after {timeout:.0f}s"
                break
            time.sleep(0.05)
        if failed is None and any(p.exitcode != 0 for p in procs):
            failed = "a rank failed"
        if failed:
            time.sleep(0.5)  # let a failing rank finish writing its traceback
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(5)
            report = [f"{fn.__module__}.{fn.__name__} on {world_size} ranks: {failed}"]
            for r, p in enumerate(procs):
                err = os.path.join(workdir, f"rank{r}.err")
                if os.path.exists(err) or p.exitcode not in (0, None):
                    report.append(f"--- rank {r} (exit code {p.exitcode}) ---")
                    report.append(open(err).read() if os.path.exists(err) else _tail(os.path.join(workdir, f"rank{r}.log")))
            raise AssertionError("\n".join(report))
        for p in procs:
            p.join()
        return [torch.load(os.path.join(workdir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def init_cpu_dist():
    """In a spawned rank: CPU mode on (no-op with CUDA), default process group from the environment."""
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    from megatron_longvideo.platform import enable_cpu_mode

    cpu = enable_cpu_mode()
    if not dist.is_initialized():
        dist.init_process_group("gloo" if cpu else "nccl")
