"""Per-forward sequence layout shared by a model's rotary embedding and its core attention.

Megatron's ``GPTModel.forward`` has no slot for explicit RoPE positions (with ``rope`` it uses
0..S-1) or for a structured mask that scales to long sequences. One :class:`SequenceContext` object
is handed to the rotary module and to every core attention of a model when the model is built; the
caller fills it for one forward with :meth:`SequenceContext.use` and it is empty again afterwards.

What it carries, for the tokens this rank holds (its CP shard, in Megatron's load-balanced order):

* ``position_ids`` ``[b, s_local]``: RoPE positions (restart at len(prefix) for each packed response).
* ``segment_ids`` ``[b, s_local]``: 0 for the shared prefix, k > 0 for packed response k. A query
  sees a key when the key comes no later in the sequence and the key is in the prefix or in the
  query's own segment. ``None`` means plain causal attention.
* ``layout``: the same pattern for the whole (unsharded) batch as a host-side
  :class:`~megatron_longvideo.attention.layout.SequenceLayout`, from which the attention derives its
  tiles. When only ``segment_ids`` are given, the first attention layer derives it (gathering the ids
  over CP, one device-to-host copy) and the other layers reuse it; callers that know the layout (the
  prefill builds it from the batch on the host) pass it and save that copy.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

__all__ = ["SequenceContext", "zigzag_index"]


def zigzag_index(local_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global sequence index of each of the ``local_len`` tokens CP rank ``cp_rank`` holds.

    Megatron's load-balanced layout: the sequence (length ``cp_size * local_len``) is cut into
    ``2 * cp_size`` chunks; rank r holds chunks r and ``2 * cp_size - 1 - r``, in that order.
    """
    if cp_size == 1:
        return torch.arange(local_len, device=device)
    if local_len % 2 != 0:
        raise ValueError(
            f"context parallelism needs an even local sequence length (2 chunks per rank), got {local_len}; "
            f"pad the global sequence to a multiple of 2 x context_parallel_size"
        )
    from megatron_longvideo.kernels.index import shard_positions

    return shard_positions(cp_size * local_len, cp_size, cp_rank, device=device)


class SequenceContext:
    """Holder of the current forward's ``position_ids`` and ``segment_ids`` (see module docstring)."""

    def __init__(self):
        self.position_ids: Optional[torch.Tensor] = None
        self.segment_ids: Optional[torch.Tensor] = None
        self.layout = None
        self._derived: dict = {}

    @contextlib.contextmanager
    def use(
        self,
        *,
        position_ids: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
        layout=None,
        derived: Optional[dict] = None,
    ) -> Iterator["SequenceContext"]:
        """Set the layout for the forward (and backward graph construction) inside the block.

        ``derived``: what an earlier use of the same inputs derived (see :meth:`state`; recompute)."""
        if position_ids is not None and not (position_ids.dim() == 2 or (position_ids.dim() == 3 and position_ids.shape[0] == 3)):
            raise ValueError(f"position_ids must be [batch, local_seq] (or [3, batch, local_seq]: multimodal RoPE), "
                             f"got shape {tuple(position_ids.shape)}")
        if segment_ids is not None and segment_ids.dim() != 2:
            raise ValueError(f"segment_ids must be [batch, local_seq], got shape {tuple(segment_ids.shape)}")
        saved = (self.position_ids, self.segment_ids, self.layout, self._derived)
        self.position_ids, self.segment_ids, self.layout = position_ids, segment_ids, layout
        self._derived = {} if derived is None else derived
        try:
            yield self
        finally:
            self.position_ids, self.segment_ids, self.layout, self._derived = saved

    def state(self) -> dict:
        """The current settings, as keyword arguments for :meth:`use` (a recomputed layer sets them again)."""
        return {"position_ids": self.position_ids, "segment_ids": self.segment_ids, "layout": self.layout,
                "derived": self._derived}

    def derived(self, key, build):
        """A value derived from this forward's settings (the layout from segment ids), built once per
        :meth:`use` block and shared by every layer."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]
