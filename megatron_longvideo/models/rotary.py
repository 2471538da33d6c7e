"""Rotary embedding at explicit position ids, a drop-in for ``GPTModel.rotary_pos_emb``.

With ``position_embedding_type="rope"`` megatron's GPTModel ignores ``position_ids`` and rotates
token i of the (CP-sharded) sequence by position i. Shared-prefix packing needs each packed response
to restart at len(prefix), and a merged video+text sequence may want its own positions; so this
subclass reads positions from the model's :class:`SequenceContext` when they are set, and otherwise
behaves exactly like megatron's ``RotaryEmbedding`` (0..S-1, sliced for this CP rank).

Multimodal RoPE (Qwen2-VL / Qwen2.5-VL, ``mrope_section=(t, h, w)``): positions are ``[3, b, s_local]``
(temporal, height, width rows; equal rows for text) and frequency ``j`` of the ``head_dim / 2`` rotates
by the row its section names: the first ``t`` frequencies by the temporal row, the next ``h`` by the
height row, the last ``w`` by the width row. The result has the plain RoPE layout, so megatron's own
``apply_rotary_pos_emb`` applies it unchanged (and CP sharding, packing and recompute see one shape).
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from megatron_longvideo.parallel.context import SequenceContext


class PositionRotaryEmbedding(RotaryEmbedding):
    """RoPE frequencies for ``SequenceContext.position_ids`` ``[b, s_local]`` -> ``[s_local, b, 1, dim]``."""

    def __init__(self, *args, sequence_context: SequenceContext, mrope_section=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sequence_context = sequence_context
        self.mrope_section = None if mrope_section is None else tuple(mrope_section)
        # megatron keeps the frequencies as a plain attribute: as a (non-saved) buffer they move with the
        # model to its device, for megatron's own 0..S-1 path too
        inv_freq = self.inv_freq
        del self.inv_freq
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        # the frequencies move with the model but stay fp32: megatron's Float16Module casts every floating
        # buffer, and bf16 frequencies times bf16 positions collapse nearby positions (1000..1003 -> 1000)
        inv_freq = self.inv_freq
        out = super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(device=self.inv_freq.device)
        return out

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        position_ids = self.sequence_context.position_ids
        if position_ids is None:
            return super().forward(max_seq_len, offset=offset, packed_seq=packed_seq, cp_group=cp_group)
        inv_freq = self.inv_freq.to(position_ids.device)  # a no-op once the model is on its device
        if self.mrope_section is not None:
            if position_ids.dim() == 2:  # text only: the three rows are equal
                position_ids = position_ids[None].expand(3, -1, -1)
            rows = position_ids.to(inv_freq.dtype)[..., None] * inv_freq  # [3, b, s_local, dim / 2]
            freqs = torch.cat([part[i] for i, part in enumerate(rows.split(self.mrope_section, dim=-1))], dim=-1)
        else:
            freqs = position_ids.to(inv_freq.dtype)[..., None] * inv_freq  # [b, s_local, dim / 2]
        if self.rotary_interleaved:
            emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)  # [b, s_local, dim]
        return emb.transpose(0, 1)[:, :, None, :]  # [s_local, b, 1, dim]
