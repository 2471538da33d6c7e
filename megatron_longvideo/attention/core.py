"""The core attention module: the tile engine under megatron's ``core_attention`` slot, for every CP mode.

Same constructor and forward as ``megatron.core.transformer.dot_product_attention.DotProductAttention``.
Each CP rank holds a shard of the sequence in Megatron's load-balanced order (two zigzag chunks); the
:class:`~megatron_longvideo.attention.layout.SequenceLayout` of the forward (plain causal, a
shared-prefix packed group, full attention in a vision tower) says who may attend to whom. The
``cp_comm_type``:

* ``all_gather``: K and V are all-gathered over the CP group (backward: reduce-scatter of their
  gradients); the rank's queries attend the gathered keys tile by tile. K/V memory O(S).
* ``a2a`` (Ulysses): all-to-all turns sequence sharding into head sharding; full-sequence tiles run
  on ``heads / cp`` heads per rank; a second all-to-all turns the output back. KV groups that CP does
  not divide are repeated just enough first.
* ``p2p`` (ring, :mod:`~megatron_longvideo.attention.ring`): K/V blocks travel the ring with the next
  transfer overlapped with the current block's tiles; the backward sends dK/dV around the ring. K/V
  memory O(S / cp).

Every mode runs the same tiles on the same fused kernels (:mod:`~megatron_longvideo.attention.backends`,
chosen at run time), merged by log-sum-exp: no ``[sq, sk]`` tensor exists in any of them. Dropout on
the attention probabilities is not available in fused-kernel form here; ``attention_dropout`` must be 0.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_longvideo.attention.backends import get_backend
from megatron_longvideo.attention.engine import tile_attention
from megatron_longvideo.attention.layout import SequenceLayout, gathered_chunks, rank_chunks
from megatron_longvideo.attention.ring import ring_attention
from megatron_longvideo.attention.tiles import plan_tiles
from megatron_longvideo.parallel import collectives

__all__ = ["TileCoreAttention", "layout_from_local_segments"]

_CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.padding_causal)


@functools.lru_cache(maxsize=64)
def _plain_layout(seq_len: int, causal: bool) -> SequenceLayout:
    # one shared object per shape: its tile plans are then built once for all layers and steps
    return SequenceLayout.plain(seq_len, causal=causal)


def layout_from_local_segments(segment_ids: torch.Tensor, cp_group, *, causal: bool = True) -> SequenceLayout:
    """The layout of CP-sharded segment ids ``[b, s_local]`` (this rank's zigzag shard): gathered over
    the CP group and put back in global order on the host. One device-to-host copy per forward: pass a
    layout to :meth:`SequenceContext.use` to avoid it."""
    from megatron_longvideo.kernels.index import unshard_index

    cp = 1 if cp_group is None else cp_group.size()
    b, s_local = segment_ids.shape
    seg = segment_ids.detach()
    if cp > 1:
        seg = collectives._gather(seg.unsqueeze(0), 0, cp_group)  # [cp, b, s_local], rank-major
        index = unshard_index(cp * s_local, cp, device=seg.device)  # [S] row of each global position
        seg = seg.permute(1, 0, 2).reshape(b, cp * s_local)[:, index]
    return SequenceLayout.from_segments(seg.cpu(), causal=causal)


class TileCoreAttention(MegatronModule):
    """Core attention over a CP-sharded sequence by tiles on fused kernels (see module docstring).

    ``kernel``: the tile kernel backend (``"auto"`` picks by device and dtype; see
    :func:`~megatron_longvideo.attention.backends.get_backend`). ``sequence_context``: the model's
    :class:`~megatron_longvideo.parallel.context.SequenceContext` (layout, or segment ids, per forward).
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        sequence_context=None,
        kernel: str = "auto",
    ):
        super().__init__(config=config)
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.cp_group = getattr(pg_collection, "cp", None)
        self.cp_size = 1 if self.cp_group is None else self.cp_group.size()
        self.cp_rank = 0 if self.cp_group is None else self.cp_group.rank()
        self.cp_comm_type = cp_comm_type or getattr(config, "cp_comm_type", None) or "all_gather"
        if isinstance(self.cp_comm_type, list):
            self.cp_comm_type = self.cp_comm_type[layer_number - 1] if len(self.cp_comm_type) > 1 else self.cp_comm_type[0]
        if self.cp_comm_type not in ("all_gather", "a2a", "p2p"):
            raise ValueError(f"cp_comm_type must be 'all_gather', 'a2a' or 'p2p', got {self.cp_comm_type!r}")
        self.attn_mask_type = attn_mask_type
        self.sequence_context = sequence_context
        tp_size = pg_collection.tp.size() if getattr(pg_collection, "tp", None) is not None else 1
        self.num_heads = config.num_attention_heads // tp_size
        self.num_groups = (config.num_query_groups or config.num_attention_heads) // tp_size
        if self.cp_comm_type == "a2a" and self.num_heads % self.cp_size != 0:
            raise ValueError(
                f"cp_comm_type='a2a': {self.num_heads} attention heads per TP rank are not divisible by "
                f"context_parallel_size={self.cp_size}"
            )
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout > 0:
            raise ValueError(
                f"attention_dropout={dropout}: the tile attention engine runs fused kernels without dropout on "
                f"the attention probabilities; set attention_dropout=0 (Qwen2 and SigLIP are trained without it) "
                f"or build the model with core_attention='megatron' (dense, no context parallelism)"
            )
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.kernel = kernel
        get_backend(kernel, check_only=True)  # an unknown name fails at build time, not in the first step

    # ------------------------------------------------------------------------------------------ #
    def _layout(self, batch: int, s_local: int, causal: bool) -> SequenceLayout:
        seq_len = s_local * self.cp_size
        ctx = self.sequence_context
        layout = None
        if ctx is not None and ctx.layout is not None:
            layout = ctx.layout
        elif ctx is not None and ctx.segment_ids is not None:
            seg = ctx.segment_ids
            if seg.shape != (batch, s_local):
                raise ValueError(f"segment_ids shape {tuple(seg.shape)} does not match [batch, local_seq] = {(batch, s_local)}")
            layout = ctx.derived("layout", lambda: layout_from_local_segments(seg, self.cp_group, causal=causal))
        if layout is None:
            return _plain_layout(seq_len, causal)
        if layout.seq_len != seq_len:
            raise ValueError(f"the sequence layout is for {layout.seq_len} tokens, but the CP ranks hold "
                             f"{self.cp_size} x {s_local} = {seq_len}")
        if layout.causal != causal:
            raise ValueError(f"the sequence layout is {'causal' if layout.causal else 'bidirectional'} but this "
                             f"attention's mask type is {self.attn_mask_type.name}")
        return layout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """query ``[s_local, b, np, hn]``, key/value ``[s_local, b, ng, hn]`` -> ``[s_local, b, np*hn]``."""
        if packed_seq_params is not None:
            raise ValueError("TileCoreAttention does not take packed_seq_params (THD); describe packed sequences "
                             "with SequenceContext (segment_ids or a SequenceLayout)")
        if attention_bias is not None:
            raise ValueError("TileCoreAttention does not support attention_bias")
        if attention_mask is not None:
            raise ValueError("TileCoreAttention does not take an explicit attention_mask (no [s, s] mask is ever "
                             "built); describe packed sequences with SequenceContext (segment_ids or a SequenceLayout)")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type in _CAUSAL_TYPES
        s_local, b, np_, hn = query.shape
        layout = self._layout(b, s_local, causal)
        backend = get_backend(self.kernel, query)
        q = query.permute(1, 2, 0, 3)  # [b, np, s_local, hn] (views: no copy)
        if self.cp_size == 1 or self.cp_comm_type == "all_gather":
            out = self._gathered(q, key, value, layout, backend)
        elif self.cp_comm_type == "a2a":
            out = self._ulysses(query, key, value, layout, backend)
        else:
            out = self._ring(q, key, value, layout, backend)
        # [b, np, s_local, hn] (memory [s_local, b, np, hn]) -> [s_local, b, np * hn]
        return out.permute(2, 0, 1, 3).reshape(s_local, b, np_ * hn)

    # ------------------------------------------------------------------------------------------ #
    def _gathered(self, q, key, value, layout, backend):
        s_local, b = key.shape[0], key.shape[1]
        key = collectives.all_gather(key, 0, self.cp_group)  # [S, b, ng, hn] (rank-major)
        value = collectives.all_gather(value, 0, self.cp_group)
        plan = layout.cached_plan(("all_gather", self.cp_size, self.cp_rank, s_local, b), lambda: plan_tiles(
            layout, b, rank_chunks(s_local, self.cp_size, self.cp_rank), gathered_chunks(s_local, self.cp_size)))
        return tile_attention(q, key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3), plan,
                              scale=self.softmax_scale, backend=backend)

    def _ulysses(self, query, key, value, layout, backend):
        group, cp = self.cp_group, self.cp_size
        s_local, b = query.shape[0], query.shape[1]
        groups = key.shape[2]
        if groups % cp:  # repeat each KV group just enough for CP to divide them (and heads stay aligned)
            rep = next(m for m in range(1, self.num_heads // groups + 1) if (groups * m) % cp == 0
                       and (self.num_heads // groups) % m == 0)
            key, value = key.repeat_interleave(rep, dim=2), value.repeat_interleave(rep, dim=2)
        # sequence-sharded [s_local, b, h, hn] -> head-sharded [S, b, h / cp, hn] (rank-major sequence)
        q = collectives.all_to_all(query, scatter_dim=2, gather_dim=0, group=group)
        k = collectives.all_to_all(key, scatter_dim=2, gather_dim=0, group=group)
        v = collectives.all_to_all(value, scatter_dim=2, gather_dim=0, group=group)
        chunks = gathered_chunks(s_local, cp)
        plan = layout.cached_plan(("a2a", cp, s_local, b), lambda: plan_tiles(layout, b, chunks, chunks))
        out = tile_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), plan,
                             scale=self.softmax_scale, backend=backend)
        out = out.permute(2, 0, 1, 3)  # [S, b, h / cp, hn]
        out = collectives.all_to_all(out, scatter_dim=0, gather_dim=2, group=group)  # [s_local, b, h, hn]
        return out.permute(1, 2, 0, 3)

    def _ring(self, q, key, value, layout, backend):
        s_local, b = key.shape[0], key.shape[1]
        cp, r = self.cp_size, self.cp_rank

        def build():
            mine = rank_chunks(s_local, cp, r)
            return tuple(plan_tiles(layout, b, mine, rank_chunks(s_local, cp, (r - t) % cp)) for t in range(cp))

        plans = layout.cached_plan(("p2p", cp, r, s_local, b), build)
        return ring_attention(q, key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3), plans,
                              scale=self.softmax_scale, backend=backend, group=self.cp_group)
