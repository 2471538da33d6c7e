"""Ring attention (``cp_comm_type="p2p"``): K/V blocks travel the CP ring, dK/dV travel back with them.

Each CP rank keeps its queries. In the forward, at step ``t`` rank ``r`` holds the K/V block of rank
``r - t``: it sends that block on to ``r + 1`` and receives the next one from ``r - 1`` while it runs
the block's tiles, merging them into its ``out``/``lse`` (O(S/cp) per rank, nothing else kept). Only
the rank's own K/V block, ``out`` and ``lse`` are saved for the backward.

In the backward the K/V blocks travel the same way, and with each block its dK/dV accumulator: at
step ``t`` rank ``r`` recomputes its queries' tiles against block ``r - t`` (the FlashAttention-2
backward from the merged ``out``/``lse``), adds its share of that block's dK/dV to the accumulator it
received from ``r - 1``, and sends it on to ``r + 1``, which holds the same block next; after the last
step each accumulator arrives back at the block's owner, complete. No forward graph is kept, so a
rank holds, besides its own saved block, at most two travelling K/V blocks (in use, arriving) and three
fp32 dK/dV accumulators (this step's, the previous step's while it is still being sent, the one
arriving): O(S / cp) in all.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from megatron_longvideo.attention.backends import Backend
from megatron_longvideo.attention.engine import _acc_dtype, new_accumulators, tile_backward, tile_forward
from megatron_longvideo.attention.tiles import TilePlan

__all__ = ["ring_attention"]

_KV_TAG, _GRAD_TAG = 0, 1


def _start_shift(send: torch.Tensor, recv: torch.Tensor, group, tag: int):
    """Post: send ``send`` to the next rank of the ring, receive ``recv`` from the previous one."""
    ranks = dist.get_process_group_ranks(group)
    n, r = len(ranks), dist.get_rank(group)
    ops = [dist.P2POp(dist.isend, send, ranks[(r + 1) % n], group, tag),
           dist.P2POp(dist.irecv, recv, ranks[(r - 1) % n], group, tag)]
    return dist.batch_isend_irecv(ops)


def _wait(reqs) -> None:
    for req in reqs:
        req.wait()


class _RingAttention(torch.autograd.Function):
    """forward: ring of K/V blocks, tiles merged by lse; backward: ring of K/V blocks and their dK/dV
    accumulators (see module docstring). ``plans[t]``: this rank's queries against rank ``r - t``'s keys."""

    @staticmethod
    def forward(ctx, q, k, v, plans, scale, backend, group):
        cp = len(plans)
        kv = torch.stack((k, v))  # [2, b, hk, s_local, d]: one contiguous message per step
        out, lse = new_accumulators(q)
        aux = []
        cur = kv
        for step in range(cp):
            reqs = None
            if step + 1 < cp:
                nxt = torch.empty_like(cur)
                reqs = _start_shift(cur, nxt, group, _KV_TAG)
            aux.append(tile_forward(q, cur[0], cur[1], plans[step], scale, backend, out, lse, fresh=step == 0))
            if reqs is not None:
                _wait(reqs)
                cur = nxt
        out = out.to(q.dtype)
        ctx.save_for_backward(q, kv, out, lse)
        ctx.plans, ctx.scale, ctx.backend, ctx.group, ctx.aux = plans, scale, backend, group, aux
        return out

    @staticmethod
    def backward(ctx, dout):
        q, kv, out, lse = ctx.saved_tensors
        plans, group = ctx.plans, ctx.group
        cp = len(plans)
        acc = _acc_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        cur = kv
        grad_reqs, arriving = None, None
        for step in range(cp):
            kv_reqs = None
            if step + 1 < cp:
                nxt = torch.empty_like(cur)
                kv_reqs = _start_shift(cur, nxt, group, _KV_TAG)
            dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)  # this rank's share for block r - step
            tile_backward(dout, q, cur[0], cur[1], out, lse, plans[step], ctx.scale, ctx.backend, ctx.aux[step],
                          dq, dkv[0], dkv[1])
            if grad_reqs is not None:  # the other ranks' shares for the same block, from r - 1
                _wait(grad_reqs)
                dkv += arriving
            arriving = torch.empty_like(dkv)
            grad_reqs = _start_shift(dkv, arriving, group, _GRAD_TAG)
            if kv_reqs is not None:
                _wait(kv_reqs)
                cur = nxt
        _wait(grad_reqs)  # this rank's own block, with every rank's share
        return dq.to(q.dtype), arriving[0].to(kv.dtype), arriving[1].to(kv.dtype), None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plans: Sequence[TilePlan], *, scale: float,
                   backend: Backend, group) -> torch.Tensor:
    """Exact attention of this rank's queries ``q`` ``[b, h, s_local, d]`` against every CP rank's keys.

    ``k``/``v`` ``[b, hk, s_local, d]`` are this rank's; ``plans[t]`` tiles the queries against the
    keys of ring step ``t`` (rank ``r - t``'s block). Returns ``[b, h, s_local, d]`` in q's dtype.
    """
    if len(plans) != dist.get_world_size(group):
        raise ValueError(f"ring_attention: {len(plans)} plans for a CP group of {dist.get_world_size(group)} ranks")
    return _RingAttention.apply(q, k, v, tuple(plans), scale, backend, group)
