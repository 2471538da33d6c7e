"""Rotary embedding at explicit position ids, a drop-in for ``GPTModel.rotary_pos_emb``.

With ``position_embedding_type="rope"`` megatron's GPTModel ignores ``position_ids`` and rotates
token i of the (CP-sharded) sequence by position i. Shared-prefix packing needs each packed response
to restart at len(prefix), and a merged video+text sequence may want its own positions; so this
subclass reads positions from the model's :class:`SequenceContext` when they are set, and otherwise
behaves exactly like megatron's ``RotaryEmbedding`` (0..S-1, sliced for this CP rank).
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from megatron_longvideo.parallel.context import SequenceContext


class PositionRotaryEmbedding(RotaryEmbedding):
    """RoPE frequencies for ``SequenceContext.position_ids`` ``[b, s_local]`` -> ``[s_local, b, 1, dim]``."""

    def __init__(self, *args, sequence_context: SequenceContext, **kwargs):
        super().__init__(*args, **kwargs)
        self.sequence_context = sequence_context
        # megatron keeps the frequencies as a plain attribute: as a (non-saved) buffer they move with the
        # model to its device, for megatron's own 0..S-1 path too
        inv_freq = self.inv_freq
        del self.inv_freq
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        position_ids = self.sequence_context.position_ids
        if position_ids is None:
            return super().forward(max_seq_len, offset=offset, packed_seq=packed_seq, cp_group=cp_group)
        inv_freq = self.inv_freq.to(position_ids.device)  # a no-op once the model is on its device
        freqs = position_ids.to(inv_freq.dtype)[..., None] * inv_freq  # [b, s_local, dim / 2]
        if self.rotary_interleaved:
            emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)  # [b, s_local, dim]
        return emb.transpose(0, 1)[:, :, None, :]  # [s_local, b, 1, dim]
