"""Shared helpers of the benchmark scripts."""

from __future__ import annotations

import threading
import time

import torch

__all__ = ["PeakMemory", "current_memory_mb"]


class PeakMemory:
    """Peak memory growth inside a ``with`` block, in MB.

    On CUDA: ``torch.cuda.max_memory_allocated`` growth. On CPU: the process's resident set size
    sampled every ``interval`` seconds by a background thread, minus the RSS at entry (the
    allocator may keep freed pages, so this is an upper bound of what the block itself needed).
    """

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak_mb, self.peak_abs_mb = interval, 0.0, 0.0

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        import psutil  # CPU sampling only (a GPU machine may not have it)

        self._proc = psutil.Process()
        self._base = self._proc.memory_info().rss
        self._peak = self._base
        self._stop = threading.Event()

        def poll():
            while not self._stop.is_set():
                self._peak = max(self._peak, self._proc.memory_info().rss)
                time.sleep(self.interval)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak_abs_mb = torch.cuda.max_memory_allocated() / 2**20
            self.peak_mb = self.peak_abs_mb - self._base / 2**20
            return False
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_mb = (self._peak - self._base) / 2**20
        self.peak_abs_mb = self._peak / 2**20
        return False


def current_memory_mb() -> float:
    """What :class:`PeakMemory` measures from: CUDA memory allocated, or this process's RSS, in MB."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def emit(table: str, out=None) -> str:
    """Print a benchmark's report and write it to ``out`` when given; returns it."""
    print(table)
    if out:
        with open(out, "w") as f:
            f.write(table + "\n")
    return table
