"""Test harness: spawn N local gloo ranks (see :mod:`megatron_longvideo.parallel.spawn`)."""

from megatron_longvideo.parallel.spawn import init_cpu_dist, run_ranks

__all__ = ["run_ranks", "init_cpu_dist"]
