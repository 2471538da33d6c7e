"""Attention over tiles, merged by log-sum-exp: O(S) memory forward and the FlashAttention-2 backward.

For one :class:`~megatron_longvideo.attention.tiles.TilePlan`, each tile is one fused kernel call that
returns its partial output ``o_t`` and row log-sum-exp ``l_t``; partial results of the same queries
merge exactly:

    lse = log(sum_t exp(l_t)),    out = sum_t exp(l_t - lse) * o_t

so the forward keeps only ``out`` and ``lse`` per query (fp32 accumulation whatever the input dtype)
and never a score, probability or mask tensor. The backward recomputes each tile from the *merged*
``out`` and ``lse``: with ``P_t = exp(q k_t^T * scale - lse)`` (the tile's block of the true softmax)
and ``D = rowsum(dout * out)``,

    dV_t = P_t^T dout,   dS_t = P_t * (dout V_t^T - D),   dQ += dS_t K_t * scale,   dK_t = dS_t^T Q * scale

which is exactly what a flash kernel's backward computes when handed ``out`` and ``lse``; summing
over tiles gives the gradients of the whole attention. :func:`tile_forward` / :func:`tile_backward`
are the two halves (the ring schedule calls them once per K/V block); :func:`tile_attention` is the
autograd Function over both.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_longvideo.attention.backends import Backend
from megatron_longvideo.attention.tiles import TilePlan

__all__ = ["tile_attention", "tile_forward", "tile_backward", "new_accumulators"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def new_accumulators(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed ``out`` ``[b, h, sq, d]`` and ``-inf`` ``lse`` ``[b, h, sq]`` accumulators for ``q``.

    ``out`` is laid out in memory as ``[sq, b, h, d]`` (megatron's activation layout), so the caller's
    final ``[sq, b, h * d]`` view costs no copy.
    """
    b, h, s, d = q.shape
    acc = _acc_dtype(q.dtype)
    out = torch.zeros(s, b, h, d, dtype=acc, device=q.device).permute(1, 2, 0, 3)
    lse = torch.full((b, h, s), float("-inf"), dtype=acc, device=q.device)
    return out, lse


def _merge_into(out: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, l: torch.Tensor, first: bool) -> None:
    """In place: (out, lse) <- merge((out, lse), (o, l)) over the same query rows; ``first``: nothing
    has been merged into these rows yet, so the tile's result is copied."""
    if first:
        out.copy_(o)
        lse.copy_(l)
        return
    new = torch.logaddexp(lse, l)
    out.mul_(torch.exp(lse - new).unsqueeze(-1)).addcmul_(o, torch.exp(l - new).unsqueeze(-1))
    lse.copy_(new)


class _Coverage:
    """Which query ranges of each row group have received a tile (a fresh accumulator's first write is a copy)."""

    def __init__(self, fresh: bool):
        self.fresh, self.seen = fresh, {}

    def first(self, rows: slice, q0: int, q1: int) -> bool:
        if not self.fresh:
            return False
        ranges = self.seen.setdefault((rows.start, rows.stop), [])
        hit = any(a < q1 and q0 < b for a, b in ranges)
        ranges.append((q0, q1))
        return not hit


def _expand(kv: torch.Tensor, heads: int) -> torch.Tensor:
    return kv if kv.shape[1] == heads else kv.repeat_interleave(heads // kv.shape[1], dim=1)


def _fold(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum the gradients of K/V heads that were repeated for their query heads: ``[b, h, s, d] -> [b, g, s, d]``."""
    b, h, s, d = grad.shape
    return grad if h == groups else grad.reshape(b, groups, h // groups, s, d).sum(2)


def tile_forward(q, k, v, plan: TilePlan, scale: float, backend: Backend, out: torch.Tensor, lse: torch.Tensor,
                 *, fresh: bool = False) -> list:
    """Run every tile of ``plan`` and merge it into the accumulators ``out`` / ``lse`` (in place).

    q ``[b, h, sq, d]``, k/v ``[b, hk, sk, d]`` (any strides). ``fresh``: the accumulators hold nothing
    yet (each query range's first tile is then copied, not merged). Returns, per tile, the kernel that
    ran it (``backend`` or its fallback for that shape) and that kernel's auxiliary outputs (what its
    backward needs besides the merged ``out``/``lse``; ``None`` for most).
    """
    heads = q.shape[1]
    coverage = _Coverage(fresh)
    aux = []
    for rows, tiles in plan.groups:
        for t in tiles:
            kernel = backend.for_tile(t.k1 - t.k0)
            qt = q[rows, :, t.q0 : t.q1]
            kt, vt = k[rows, :, t.k0 : t.k1], v[rows, :, t.k0 : t.k1]
            if not kernel.native_gqa:
                kt, vt = _expand(kt, heads), _expand(vt, heads)
            o, l, a = kernel.forward(qt, kt, vt, t.causal, scale)
            _merge_into(out[rows, :, t.q0 : t.q1], lse[rows, :, t.q0 : t.q1], o, l, coverage.first(rows, t.q0, t.q1))
            aux.append((kernel, a))
    return aux


def tile_backward(dout, q, k, v, out, lse, plan: TilePlan, scale: float, backend: Backend, aux: list,
                  dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Add every tile's ``dq`` / ``dk`` / ``dv`` (recomputed from the merged ``out``/``lse``) into the
    fp32 accumulators ``dq`` ``[b, h, sq, d]``, ``dk``/``dv`` ``[b, hk, sk, d]`` (in place)."""
    heads, groups = q.shape[1], k.shape[1]
    i = 0
    for rows, tiles in plan.groups:
        for t in tiles:
            kernel, a = aux[i]  # the kernel that ran the tile's forward
            i += 1
            qs, ks = slice(t.q0, t.q1), slice(t.k0, t.k1)
            kt, vt = k[rows, :, ks], v[rows, :, ks]
            if not kernel.native_gqa:
                kt, vt = _expand(kt, heads), _expand(vt, heads)
            gq, gk, gv = kernel.backward(dout[rows, :, qs], q[rows, :, qs], kt, vt, out[rows, :, qs], lse[rows, :, qs],
                                         a, t.causal, scale)
            dq[rows, :, qs] += gq
            dk[rows, :, ks] += gk if kernel.native_gqa else _fold(gk, groups)
            dv[rows, :, ks] += gv if kernel.native_gqa else _fold(gv, groups)


class _TileAttention(torch.autograd.Function):
    """forward: tiles merged by log-sum-exp (saves q, k, v, out, lse); backward: each tile recomputed
    from the merged out/lse by the kernel's backward, summed into dq, dk, dv (see module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale, backend):
        out, lse = new_accumulators(q)
        aux = tile_forward(q, k, v, plan, scale, backend, out, lse, fresh=True)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.backend, ctx.aux = plan, scale, backend, aux
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        acc = _acc_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        tile_backward(dout, q, k, v, out, lse, ctx.plan, ctx.scale, ctx.backend, ctx.aux, dq, dk, dv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def tile_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: TilePlan, *, scale: float,
                   backend: Backend, return_lse: bool = False):
    """Exact softmax attention over ``plan``'s tiles.

    q ``[b, h, sq, d]``, k/v ``[b, hk, sk, d]`` with ``h % hk == 0`` (grouped-query attention; K/V
    are not repeated when the kernel takes GQA natively) -> out ``[b, h, sq, d]`` in q's dtype, laid out
    in memory as ``[sq, b, h, d]``. Every query row must be covered by at least one tile (true of
    every causal layout: a token sees itself). ``return_lse`` (no autograd) also returns the fp32 lse.
    """
    _check(q, k, v, plan)
    if return_lse:
        with torch.no_grad():
            out, lse = new_accumulators(q)
            tile_forward(q, k, v, plan, scale, backend, out, lse, fresh=True)
            return out.to(q.dtype), lse
    return _TileAttention.apply(q, k, v, plan, scale, backend)


def _check(q, k, v, plan: Optional[TilePlan]):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [b, h, sq, d] and k, v [b, hk, sk, d], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if plan is not None and (plan.num_queries != q.shape[2] or plan.num_keys != k.shape[2]):
        raise ValueError(f"the tile plan is for {plan.num_queries} queries x {plan.num_keys} keys, got "
                         f"{q.shape[2]} x {k.shape[2]}")
