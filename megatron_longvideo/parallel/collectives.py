"""Autograd-aware collectives over group-local communication.

Every function here is an ``autograd.Function`` with its backward stated in the docstring, allocates
on the input's device (never ``torch.cuda.current_device()``), works on gloo subgroups (where
``torch.distributed.nn.functional.all_gather``'s backward fails), and returns its input unchanged
when the group has one rank.

Notation: ``N`` is the group size, ``r`` this rank's index in the group, ``x_r`` rank r's input.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

__all__ = [
    "all_gather",
    "reduce_scatter",
    "split",
    "all_reduce",
    "copy_to_group",
    "all_to_all",
    "ring_shift",
]


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    if x.shape[dim] % n != 0:
        raise ValueError(f"reduce_scatter: dim {dim} of size {x.shape[dim]} is not divisible by the group size {n}")
    if dist.get_backend(group) == "nccl":
        chunks = [c.contiguous() for c in x.chunk(n, dim=dim)]
        out = torch.empty_like(chunks[0])
        dist.reduce_scatter(out, chunks, group=group)
        return out
    # gloo has no reduce-scatter: all-reduce, then keep this rank's slice.
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x.chunk(n, dim=dim)[_rank(group)].contiguous()


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    if x.shape[dim] % n != 0:
        raise ValueError(f"split: dim {dim} of size {x.shape[dim]} is not divisible by the group size {n}")
    return x.chunk(n, dim=dim)[_rank(group)].contiguous()


class _AllGather(torch.autograd.Function):
    """forward: all-gather along ``dim``; backward: reduce-scatter (sum) or this rank's slice."""

    @staticmethod
    def forward(ctx, x, dim, group, grad_reduce, grad_scale):
        ctx.dim, ctx.group, ctx.grad_reduce, ctx.grad_scale = dim, group, grad_reduce, grad_scale
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.grad_reduce == "sum":
            out = _reduce_scatter(grad, ctx.dim, ctx.group)
        else:
            out = _split(grad, ctx.dim, ctx.group)
        if ctx.grad_scale != 1.0:
            out = out * ctx.grad_scale
        return out, None, None, None, None


def all_gather(x: torch.Tensor, dim: int, group, *, grad_reduce: str = "sum", grad_scale: float = 1.0) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (same shape on every rank).

    forward: ``y = cat(x_0, ..., x_{N-1}, dim)``.
    backward with ``grad_reduce="sum"``: ``dx_r = sum_k dy^(k)[slice r]`` (reduce-scatter), right when
    each rank uses ``y`` for a different part of the loss (CP, encode group). With ``"slice"``:
    ``dx_r = dy[slice r]``, right when every rank computes the same, replicated loss from ``y``.
    ``grad_scale`` multiplies the result: ``1/m`` when the group holds ``m`` identical replicas of
    each loss part (the TP ranks of an encode group spanning TP x CP).
    """
    if grad_reduce not in ("sum", "slice"):
        raise ValueError(f"grad_reduce must be 'sum' or 'slice', got {grad_reduce!r}")
    if _size(group) == 1:
        return x
    return _AllGather.apply(x, dim, group, grad_reduce, float(grad_scale))


class _ReduceScatter(torch.autograd.Function):
    """forward: reduce-scatter (sum) along ``dim``; backward: all-gather along ``dim``."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim, ctx.group), None, None


def reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """forward: ``y_r = (sum_k x_k)[slice r along dim]``; backward: all-gather of ``dy`` along ``dim``."""
    if _size(group) == 1:
        return x
    return _ReduceScatter.apply(x, dim, group)


class _Split(torch.autograd.Function):
    """forward: keep this rank's slice along ``dim``; backward: all-gather along ``dim``."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim, ctx.group), None, None


def split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """forward: ``y_r = x[slice r along dim]`` (x replicated); backward: all-gather of ``dy``.

    The backward assumes each rank's slice feeds a different part of the loss, so the full gradient
    of the replicated ``x`` is the concatenation of the slices' gradients.
    """
    if _size(group) == 1:
        return x
    return _Split.apply(x, dim, group)


class _AllReduce(torch.autograd.Function):
    """forward: all-reduce (sum); backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """forward: ``y = sum_k x_k``; backward: ``dx_r = dy`` (the loss downstream is replicated)."""
    if _size(group) == 1:
        return x
    return _AllReduce.apply(x, group)


class _CopyToGroup(torch.autograd.Function):
    """forward: identity; backward: all-reduce (sum)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    """forward: ``y = x`` (x replicated); backward: ``dx = sum_k dy_k`` (each rank's loss part)."""
    if _size(group) == 1:
        return x
    return _CopyToGroup.apply(x, group)


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    n = _size(group)
    if x.shape[scatter_dim] % n != 0:
        raise ValueError(
            f"all_to_all: scatter dim {scatter_dim} of size {x.shape[scatter_dim]} is not divisible by the group size {n}"
        )
    inputs = [c.contiguous() for c in x.chunk(n, dim=scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(n)]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """forward: all-to-all (scatter ``scatter_dim``, gather ``gather_dim``); backward: the reverse."""

    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Split ``x`` into N chunks along ``scatter_dim``, send chunk k to rank k, concatenate what is
    received along ``gather_dim`` (rank order). Ulysses uses it sequence->heads and heads->sequence.

    backward: the same all-to-all with the two dims swapped.
    """
    if _size(group) == 1:
        return x
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


def _shift(x: torch.Tensor, group, offset: int) -> torch.Tensor:
    n, r = _size(group), _rank(group)
    ranks = dist.get_process_group_ranks(group)
    x = x.contiguous()
    out = torch.empty_like(x)
    ops = [
        dist.P2POp(dist.isend, x, ranks[(r + offset) % n], group=group),
        dist.P2POp(dist.irecv, out, ranks[(r - offset) % n], group=group),
    ]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


class _RingShift(torch.autograd.Function):
    """forward: send to rank r+1, receive from r-1; backward: send the gradient to r-1, receive from r+1."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _shift(x, group, 1)

    @staticmethod
    def backward(ctx, grad):
        return _shift(grad, ctx.group, -1), None


def ring_shift(x: torch.Tensor, group) -> torch.Tensor:
    """forward: ``y_r = x_{r-1}`` (ring over the group); backward: ``dx_r = dy_{r+1}``."""
    if _size(group) == 1:
        return x
    return _RingShift.apply(x, group)


def group_ranks(group: Optional[dist.ProcessGroup]) -> list[int]:
    """Global ranks of ``group`` in group order ([0] without distributed)."""
    return [0] if group is None else dist.get_process_group_ranks(group)
