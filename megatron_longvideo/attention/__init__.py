"""The attention engine: exact attention as tiles on fused kernels, merged by log-sum-exp.

* :mod:`~megatron_longvideo.attention.layout`: who may attend to whom (:class:`SequenceLayout`), and
  where each piece of the sequence lives on a CP rank (zigzag chunks);
* :mod:`~megatron_longvideo.attention.tiles`: the non-empty ``(query range, key range, full | causal)``
  tiles of a layout, for any placement of queries and keys;
* :mod:`~megatron_longvideo.attention.backends`: the fused kernels a tile runs on, chosen at run time;
* :mod:`~megatron_longvideo.attention.engine`: the autograd Function (forward keeps ``out``/``lse``
  only; backward recomputes each tile from them);
* :mod:`~megatron_longvideo.attention.ring`: the ``p2p`` CP schedule (K/V and dK/dV around the ring);
* :mod:`~megatron_longvideo.attention.core`: the megatron ``core_attention`` module for every CP mode
  (imports megatron-core);
* :mod:`~megatron_longvideo.attention.dense`: the dense oracle the tests compare against.
"""

from megatron_longvideo.attention.backends import KERNELS, get_backend
from megatron_longvideo.attention.engine import tile_attention
from megatron_longvideo.attention.layout import SequenceLayout, gathered_chunks, rank_chunks
from megatron_longvideo.attention.tiles import Tile, TilePlan, plan_tiles

__all__ = ["SequenceLayout", "rank_chunks", "gathered_chunks", "Tile", "TilePlan", "plan_tiles", "tile_attention",
           "get_backend", "KERNELS"]
