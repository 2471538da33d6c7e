"""The dense oracle: masked softmax attention with the ``[sq, sk]`` scores materialised.

Kept only as the reference the tests compare every kernel backend and every CP schedule against
(and as the ``dense`` backend a test may select explicitly). It builds the mask from the same
:class:`~megatron_longvideo.attention.layout.SequenceLayout` rule as the tile planner, but
independently of it: from global query and key indices, position by position.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_longvideo.attention.layout import Chunk, SequenceLayout

__all__ = ["chunk_index", "visible_mask", "dense_attention"]


def chunk_index(chunks: Sequence[Chunk], device=None) -> torch.Tensor:
    """``[n]`` global position of each local row described by ``chunks``."""
    n = sum(c[1] for c in chunks)
    out = torch.empty(n, dtype=torch.long)
    for g, length, local in chunks:
        out[local : local + length] = torch.arange(g, g + length)
    return out.to(device)


def visible_mask(layout: SequenceLayout, batch: int, q_index: torch.Tensor, k_index: torch.Tensor,
                 segments: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bool ``[batch, 1, sq, sk]``: True where local query row i may attend local key row j.

    ``segments``: the raw per-position segment ids ``[batch, seq_len]`` the layout was made from
    (tests pass them, so the oracle does not share the layout's run encoding with the planner);
    default: the layout's own."""
    rows = []
    for b in range(batch):
        if segments is not None:
            seg = segments[b].cpu()
        else:
            seg = layout.segment_ids(0 if layout.rows is None else b)
        qs, ks = seg[q_index.cpu()], seg[k_index.cpu()]
        ok = ks[None, :] == qs[:, None]
        if layout.shared_segment is not None:
            ok = ok | (ks[None, :] == layout.shared_segment)
        if layout.causal:
            ok = ok & (k_index.cpu()[None, :] <= q_index.cpu()[:, None])
        rows.append(ok)
    return torch.stack(rows)[:, None].to(q_index.device)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: Optional[torch.Tensor],
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[b, h, sq, d]``, k/v ``[b, hk, sk, d]`` (``h`` a multiple of ``hk``), visible ``[b|1, 1, sq, sk]``
    -> ``(out [b, h, sq, d] in q's dtype, lse [b, h, sq] fp32 or fp64)``. Differentiable by autograd."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale  # [b, h, sq, sk]
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [b, h, sq]
    probs = torch.exp(scores - lse[..., None])
    out = torch.matmul(probs, v.to(acc))
    return out.to(q.dtype), lse
