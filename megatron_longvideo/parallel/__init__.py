"""Parallel layout: process groups, autograd collectives, the per-forward sequence context.

Submodules: ``groups`` (ParallelConfig, ParallelGroups, initialize_parallel), ``collectives``
(autograd all-gather / reduce-scatter / all-to-all / split / ring shift), ``context``
(SequenceContext, zigzag_index). Context-parallel attention lives in :mod:`megatron_longvideo.attention`.
"""

from megatron_longvideo.parallel.context import SequenceContext, zigzag_index
from megatron_longvideo.parallel.groups import (
    ParallelConfig,
    ParallelGroups,
    destroy_parallel,
    initialize_parallel,
    single_rank_groups,
)

__all__ = [
    "ParallelConfig", "ParallelGroups", "initialize_parallel", "destroy_parallel", "single_rank_groups",
    "SequenceContext", "zigzag_index",
]
