"""Padding, sharding and merging kernels for context-parallel (CP) prefill of long merged sequences.

``index``: pure index math of Megatron's load-balanced ("zigzag") CP layout. ``ops``: the public ops,
run by the C++ (CPU) or CUDA extension built from ``csrc/``, or by the torch reference in
``reference`` when an extension is missing (one warning per process). ``backend()`` says which runs.
Importing this package never imports an extension.
"""

from . import reference
from .index import (
    all_shard_positions,
    inverse_index,
    local_length,
    merge_source_index,
    merge_source_index_batched,
    padded_length,
    shard_positions,
    unshard_index,
)
from .ops import (
    MergeShard,
    Shard,
    Unshard,
    backend,
    merge_shard,
    merge_shard_backward,
    shard,
    unshard,
)

__all__ = [
    "MergeShard",
    "Shard",
    "Unshard",
    "all_shard_positions",
    "backend",
    "inverse_index",
    "local_length",
    "merge_shard",
    "merge_shard_backward",
    "merge_source_index",
    "merge_source_index_batched",
    "padded_length",
    "reference",
    "shard",
    "shard_positions",
    "unshard",
    "unshard_index",
]
