"""Context-parallel core attention without TransformerEngine.

Plugs into the ``core_attention`` slot of a megatron-core layer spec (same constructor and forward
as ``megatron.core.transformer.dot_product_attention.DotProductAttention``). Each CP rank holds a
shard of the sequence in Megatron's load-balanced order (:func:`zigzag_index`); this module makes
attention over the whole sequence from the shards. ``cp_comm_type``:

* ``all_gather``: K and V are all-gathered over the CP group (backward: reduce-scatter of their
  gradients); every rank attends its local queries to all keys. Exact, simplest, K/V memory O(S).
* ``a2a`` (Ulysses): all-to-all turns sequence sharding into head sharding, full-sequence attention
  runs on ``heads / cp`` heads per rank, and a second all-to-all turns it back. Needs the per-TP
  head count divisible by CP; KV groups not divisible by CP are expanded to query heads first.
* ``p2p`` (ring): K/V blocks travel around the CP ring; each step attends to one block and partial
  results are merged with their log-sum-exp. Exact; the backward is autograd through the ring
  (gradients travel the ring the other way), so activation memory is that of ``all_gather``.

Masks are built from global sequence indices, never as an S x S tensor across ranks: causal
(key index <= query index), plus the packed-response rule of :class:`SequenceContext` (a key is
visible if it is in the shared prefix or in the query's own segment). With CP = 1 an explicit
megatron mask (``[b, 1, sq, sk]``, True = masked out) is also honoured.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_longvideo.parallel import collectives
from megatron_longvideo.parallel.context import SequenceContext, zigzag_index

__all__ = ["CPCoreAttention", "attend"]

_CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.padding_causal)


def _visible(q_idx, k_idx, q_seg, k_seg, causal: bool) -> Optional[torch.Tensor]:
    """Bool mask [b or 1, 1, sq, sk], True where the query may attend the key (None = all)."""
    mask = None
    if causal:
        mask = (k_idx[None, :] <= q_idx[:, None])[None, None]  # [1, 1, sq, sk]
    if q_seg is not None:
        same = (k_seg[:, None, :] == 0) | (k_seg[:, None, :] == q_seg[:, :, None])  # [b, sq, sk]
        same = same[:, None]
        mask = same if mask is None else mask & same
    return mask


def attend(q, k, v, visible: Optional[torch.Tensor], scale: float, dropout=None, return_lse: bool = False):
    """Softmax attention. q ``[b, h, sq, d]``, k/v ``[b, h, sk, d]``, visible ``[*, 1, sq, sk]``.

    Scores and softmax in fp32; returns ``[b, h, sq, d]`` in q's dtype (and the row log-sum-exp
    ``[b, h, sq]`` when ``return_lse``).
    """
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [b, h, sq, sk]
    if visible is not None:
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    if return_lse:
        lse = torch.logsumexp(scores, dim=-1)  # [b, h, sq]
        probs = torch.exp(scores - lse[..., None])
    else:
        probs = torch.softmax(scores, dim=-1)
    if dropout is not None:
        probs = dropout(probs)
    out = torch.matmul(probs.to(v.dtype), v)
    return (out, lse) if return_lse else out


class CPCoreAttention(MegatronModule):
    """Core attention over a CP-sharded sequence (see module docstring)."""

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
        sequence_context: Optional[SequenceContext] = None,
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
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.attention_dropout = torch.nn.Dropout(p) if p > 0 else None

    # ------------------------------------------------------------------------------------------ #
    def _layout(self, s_local: int, device):
        q_idx = zigzag_index(s_local, self.cp_size, self.cp_rank, device)  # [s_local]
        ctx = self.sequence_context
        seg = None if ctx is None else ctx.segment_ids  # [b, s_local]
        return q_idx, seg

    def _dropout(self):
        if self.attention_dropout is None or not self.training:
            return None
        return self._tp_dropout

    def _tp_dropout(self, probs):
        # heads are split over TP, so each TP rank draws its own mask (megatron's model-parallel RNG)
        from megatron.core import tensor_parallel

        with tensor_parallel.get_cuda_rng_tracker().fork():
            return self.attention_dropout(probs)

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
            raise ValueError("CPCoreAttention does not take packed_seq_params (THD); pack with SequenceContext.segment_ids")
        if attention_bias is not None:
            raise ValueError("CPCoreAttention does not support attention_bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type in _CAUSAL_TYPES
        if attention_mask is not None and self.cp_size > 1:
            raise ValueError(
                "an explicit attention_mask cannot be used with context parallelism; describe packed "
                "sequences with SequenceContext.segment_ids instead"
            )
        s_local, b, np_, hn = query.shape
        q_idx, q_seg = self._layout(s_local, query.device)
        if q_seg is not None and q_seg.shape != (b, s_local):
            raise ValueError(f"segment_ids shape {tuple(q_seg.shape)} does not match [batch, local_seq] = {(b, s_local)}")

        if self.cp_comm_type == "a2a" and self.cp_size > 1:
            out = self._ulysses(query, key, value, q_idx, q_seg, causal)  # [b, np, s_local, hn]
        elif self.cp_comm_type == "p2p" and self.cp_size > 1:
            out = self._ring(query, key, value, q_idx, q_seg, causal)
        else:
            out = self._gathered(query, key, value, q_idx, q_seg, causal, attention_mask)
        # [b, np, s_local, hn] -> [s_local, b, np * hn]
        return out.permute(2, 0, 1, 3).reshape(s_local, b, np_ * hn)

    # ------------------------------------------------------------------------------------------ #
    def _expand_kv(self, kv: torch.Tensor, num_heads: int) -> torch.Tensor:
        """[s, b, ng, hn] -> [b, np, s, hn] with each KV group repeated for its query heads."""
        groups = kv.shape[2]
        if groups != num_heads:
            kv = kv.repeat_interleave(num_heads // groups, dim=2)
        return kv.permute(1, 2, 0, 3)

    def _gathered(self, query, key, value, q_idx, q_seg, causal, attention_mask):
        key = collectives.all_gather(key, 0, self.cp_group)  # [S, b, ng, hn] (rank-major)
        value = collectives.all_gather(value, 0, self.cp_group)
        k_idx = self._gathered_index(q_idx)
        k_seg = self._gather_plain(q_seg, dim=1)
        visible = _visible(q_idx, k_idx, q_seg, k_seg, causal)
        if attention_mask is not None:
            allowed = ~attention_mask
            visible = allowed if visible is None else visible & allowed
        q = query.permute(1, 2, 0, 3)  # [b, np, s_local, hn]
        k = self._expand_kv(key, q.shape[1])
        v = self._expand_kv(value, q.shape[1])
        return attend(q, k, v, visible, self.softmax_scale, self._dropout())

    def _ulysses(self, query, key, value, q_idx, q_seg, causal):
        group = self.cp_group
        np_ = query.shape[2]
        if key.shape[2] % self.cp_size != 0:
            key = key.repeat_interleave(np_ // key.shape[2], dim=2)
            value = value.repeat_interleave(np_ // value.shape[2], dim=2)
        # sequence-sharded [s_local, b, h, hn] -> head-sharded [S, b, h / cp, hn]
        q = collectives.all_to_all(query, scatter_dim=2, gather_dim=0, group=group)
        k = collectives.all_to_all(key, scatter_dim=2, gather_dim=0, group=group)
        v = collectives.all_to_all(value, scatter_dim=2, gather_dim=0, group=group)
        idx = self._gathered_index(q_idx)
        seg = self._gather_plain(q_seg, dim=1)
        visible = _visible(idx, idx, seg, seg, causal)
        qh = q.permute(1, 2, 0, 3)  # [b, h / cp, S, hn]
        out = attend(qh, self._expand_kv(k, qh.shape[1]), self._expand_kv(v, qh.shape[1]), visible,
                     self.softmax_scale, self._dropout())
        out = out.permute(2, 0, 1, 3)  # [S, b, h / cp, hn]
        out = collectives.all_to_all(out, scatter_dim=0, gather_dim=2, group=group)  # [s_local, b, h, hn]
        return out.permute(1, 2, 0, 3)

    def _ring(self, query, key, value, q_idx, q_seg, causal):
        group = self.cp_group
        q = query.permute(1, 2, 0, 3)  # [b, np, s_local, hn]
        k_idx, k_seg = q_idx, q_seg
        outs, lses = [], []
        for step in range(self.cp_size):
            if step > 0:
                key = collectives.ring_shift(key, group)
                value = collectives.ring_shift(value, group)
                k_idx = zigzag_index(q_idx.numel(), self.cp_size, (self.cp_rank - step) % self.cp_size, q_idx.device)
                k_seg = None if k_seg is None else collectives._shift(k_seg, group, 1)
            visible = _visible(q_idx, k_idx, q_seg, k_seg, causal)
            out, lse = attend(q, self._expand_kv(key, q.shape[1]), self._expand_kv(value, q.shape[1]),
                              visible, self.softmax_scale, self._dropout(), return_lse=True)
            outs.append(out)
            lses.append(lse)
        lse_all = torch.logsumexp(torch.stack(lses), dim=0)  # [b, np, s_local]
        merged = sum(o.float() * torch.exp(l - lse_all)[..., None] for o, l in zip(outs, lses))
        return merged.to(query.dtype)

    def _gathered_index(self, q_idx: torch.Tensor) -> torch.Tensor:
        if self.cp_size == 1:
            return q_idx
        return torch.cat([zigzag_index(q_idx.numel(), self.cp_size, r, q_idx.device) for r in range(self.cp_size)])

    def _gather_plain(self, x: Optional[torch.Tensor], dim: int) -> Optional[torch.Tensor]:
        if x is None or self.cp_size == 1:
            return x
        with torch.no_grad():
            return collectives._gather(x, dim, self.cp_group)
