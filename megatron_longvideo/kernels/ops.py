"""Shard / unshard / merge ops: the C++ kernels on CPU tensors, the CUDA kernels on CUDA tensors.

A missing extension (not built, or ``MLV_KERNELS=torch`` in the environment) falls back to the torch
reference in ``kernels.reference``, with one warning per process. The extensions are imported on first
use, so importing this module never fails and costs nothing beyond torch.

Every kernel moves whole rows of bytes (one row = everything after the sequence dim), so any dtype
works; results equal the reference bit for bit. Bad indices raise on CPU (the C++ kernels check them);
on CUDA an out-of-range index gives a padding row instead (checking would cost a device sync), and a
repeated video row in ``merge_shard_backward`` is a race: index math from ``kernels.index`` never
produces either.
"""

import importlib
import os
import warnings
from math import prod

import torch

from . import reference
from .index import inverse_index

_EXTENSIONS = {"cpu": "megatron_longvideo._kernels_cpu", "cuda": "megatron_longvideo._kernels_cuda"}
_loaded = {}  # device type -> module or None
_warned = False


def _load(device_type):
    if device_type not in _loaded:
        try:
            _loaded[device_type] = importlib.import_module(_EXTENSIONS[device_type])
        except ImportError as err:
            _loaded[device_type] = None
            _warn_once(f"the {device_type} kernel extension is not available ({err})")
    return _loaded[device_type]


def _warn_once(reason):
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"megatron_longvideo.kernels: {reason}; using the torch reference ops instead. Build the "
            "extensions with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )


def _ext(device):
    """The extension for tensors on ``device``, or None to use the torch reference."""
    if os.environ.get("MLV_KERNELS") == "torch" or device.type not in _EXTENSIONS:
        return None
    return _load(device.type)


def backend(device=None) -> str:
    """Which implementation runs for tensors on ``device``: ``"cuda"``, ``"cpu"`` (C++) or ``"torch"``.

    ``device`` defaults to CUDA when available, else CPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return device.type if _ext(device) is not None else "torch"


def _plain(n, row_bytes):
    """Row layout (chunk_len, chunk_stride, outer_stride) of a contiguous ``[outer, n, row]``."""
    return [max(n, 1), 0, n * row_bytes]


def _chunked(s_local, outer, row_bytes):
    """Row layout of a rank-major ``[cp, outer, s_local, row]``: flat row j = rank * s_local + local."""
    return [max(s_local, 1), outer * s_local * row_bytes, s_local * row_bytes]


def _split(shape, dim, elem_size):
    """(outer, n, row_bytes) of a contiguous tensor of ``shape`` seen as ``[outer, n, row]`` at ``dim``."""
    return prod(shape[:dim]), shape[dim], prod(shape[dim + 1 :]) * elem_size


def _empty(out, shape, like, name="out"):
    """A fresh output, or ``out`` (preallocated, e.g. a reused buffer) after checking it fits."""
    if out is None:
        return like.new_empty(shape)
    if out.shape != shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"{name} must be {like.dtype} {tuple(shape)} on {like.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return out


def _pad(pad_value, dtype):
    return torch.tensor([pad_value], dtype=dtype, device="cpu").view(torch.uint8)  # one element's bytes, read on the host


def _shard(x, positions, dim, pad_value, out=None):
    ext = _ext(x.device)
    if ext is None:
        return reference.shard(x, positions, dim, pad_value)
    dim = reference._check_dim(x, dim, "x")
    if positions.dim() != 1:
        raise ValueError(f"positions must be 1-D, got shape {tuple(positions.shape)}")
    x = x.contiguous()
    positions = positions.to(device=x.device, dtype=torch.long).contiguous()
    n_out = positions.numel()
    outer, n_src, row_bytes = _split(x.shape, dim, x.element_size())
    out = _empty(out, x.shape[:dim] + (n_out,) + x.shape[dim + 1 :], x)  # [..., s_local, ...]
    ext.gather_rows(out, x, positions, outer, n_src, row_bytes, _plain(n_out, row_bytes),
                    _plain(n_src, row_bytes), _pad(pad_value, x.dtype))
    return out


def _unshard(gathered, index, dim, out=None):
    ext = _ext(gathered.device)
    if ext is None:
        return reference.unshard(gathered, index, dim)
    cp = gathered.shape[0]
    per_rank = gathered.shape[1:]
    dim = reference._check_dim(gathered[0], dim, "gathered[0]")
    gathered = gathered.contiguous()
    index = index.to(device=gathered.device, dtype=torch.long).contiguous()
    s_local = per_rank[dim]
    outer, _, row_bytes = _split(per_rank, dim, gathered.element_size())
    out = _empty(out, per_rank[:dim] + (index.numel(),) + per_rank[dim + 1 :], gathered)
    ext.gather_rows(out, gathered, index, outer, cp * s_local, row_bytes,
                    _plain(index.numel(), row_bytes), _chunked(s_local, outer, row_bytes),
                    _pad(0, gathered.dtype))
    return out  # [..., S, ...]


def _reshard(grad, index, cp, s_local, dim):
    """Every rank's shard of ``grad`` (``S`` along ``dim``): ``[cp, ..., s_local, ...]``."""
    positions = inverse_index(index, cp * s_local)  # [cp * s_local], rank-major, -1 = padding
    ext = _ext(grad.device)
    if ext is None:
        flat = reference.shard(grad, positions, dim)  # [..., cp * s_local, ...]
        return flat.unflatten(dim, (cp, s_local)).movedim(dim, 0)
    grad = grad.contiguous()
    outer, seq_len, row_bytes = _split(grad.shape, dim, grad.element_size())
    out = grad.new_empty((cp,) + grad.shape[:dim] + (s_local,) + grad.shape[dim + 1 :])
    ext.gather_rows(out, grad, positions, outer, seq_len, row_bytes,
                    _chunked(s_local, outer, row_bytes), _plain(seq_len, row_bytes),
                    _pad(0, grad.dtype))
    return out


def _merge(text_shard, video, src_index, out=None):
    ext = _ext(text_shard.device)
    if ext is None or text_shard.shape[-1] == 0:
        return reference.merge_shard(text_shard, video, src_index)
    reference._check_merge(text_shard, video, src_index)
    text_shard, video = text_shard.contiguous(), video.contiguous()
    out = _empty(out, text_shard.shape, text_shard)  # [*lead, h]
    code = src_index.to(device=text_shard.device, dtype=torch.long).reshape(-1).contiguous()
    ext.merge_rows(out, text_shard, video, code, text_shard.shape[-1] * text_shard.element_size())
    return out


def merge_shard_backward(grad_out, src_index, num_video, out=None):
    """Grads of ``merge_shard``: ``(grad_text_shard [*lead, H], grad_video [num_video, H])``.

    ``grad_text_shard`` is ``grad_out`` at text rows and zero elsewhere; ``grad_video`` row ``k`` is
    ``grad_out`` at the position whose code is ``k``, zero for video rows not in this shard.
    ``out``: optional preallocated ``(grad_text_shard, grad_video)`` (used by the kernels only).
    """
    ext = _ext(grad_out.device)
    if ext is None or grad_out.shape[-1] == 0:
        return reference.merge_shard_backward(grad_out, src_index, num_video)
    grad_out = grad_out.contiguous()
    hidden = grad_out.shape[-1]
    out = (None, None) if out is None else out
    grad_text = _empty(out[0], grad_out.shape, grad_out, "out[0]")  # [*lead, h]
    grad_video = _empty(out[1], (num_video, hidden), grad_out, "out[1]")  # [V, h]
    code = src_index.to(device=grad_out.device, dtype=torch.long).reshape(-1).contiguous()
    ext.merge_rows_backward(grad_text, grad_video, grad_out, code, hidden * grad_out.element_size())
    return grad_text, grad_video


class Shard(torch.autograd.Function):
    """forward: gather ``x`` along ``dim`` at ``positions`` (``-1`` -> ``pad_value``).
    backward: gather the grad with the inverse positions (rows this rank does not hold get zero)."""

    @staticmethod
    def forward(ctx, x, positions, dim, pad_value):
        dim = reference._check_dim(x, dim, "x")
        ctx.save_for_backward(positions)
        ctx.dim, ctx.size = dim, x.shape[dim]
        return _shard(x, positions, dim, pad_value)

    @staticmethod
    def backward(ctx, grad):
        (positions,) = ctx.saved_tensors
        inv = inverse_index(positions.to(grad.device), ctx.size)  # [size]
        return _shard(grad, inv, ctx.dim, 0), None, None, None


class Unshard(torch.autograd.Function):
    """forward: ``[cp, ..., s_local, ...]`` -> ``[..., S, ...]`` in original order, padding dropped.
    backward: re-shard the grad, every rank's slice (``[cp, ..., s_local, ...]``, zero at padding);
    an all-gather's backward then keeps this rank's slice."""

    @staticmethod
    def forward(ctx, gathered, index, dim):
        dim = reference._check_dim(gathered[0], dim, "gathered[0]")
        ctx.save_for_backward(index)
        ctx.dim, ctx.cp, ctx.s_local = dim, gathered.shape[0], gathered.shape[dim + 1]
        return _unshard(gathered, index, dim)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return _reshard(grad, index.to(grad.device), ctx.cp, ctx.s_local, ctx.dim), None, None


class MergeShard(torch.autograd.Function):
    """forward: ``out[i] = video[k]`` (``k = src_index[i] >= 0``), ``text_shard[i]`` (``-1``), 0 (``-2``).
    backward: ``merge_shard_backward`` (grads to the text shard and to the video rows)."""

    @staticmethod
    def forward(ctx, text_shard, video, src_index):
        ctx.save_for_backward(src_index)
        ctx.num_video = video.shape[0]
        return _merge(text_shard, video, src_index)

    @staticmethod
    def backward(ctx, grad):
        (src_index,) = ctx.saved_tensors
        grad_text, grad_video = merge_shard_backward(grad, src_index, ctx.num_video)
        return grad_text, grad_video, None


def shard(x, positions, dim=0, pad_value=0):
    """This rank's padded shard of ``x`` along ``dim`` (``positions``: ``shard_positions(...)``)."""
    return Shard.apply(x, positions, dim, pad_value)


def unshard(gathered, index, dim=0):
    """Original order from every rank's shard: ``gathered`` ``[cp, *per_rank]`` or a list of per-rank
    tensors (stacked first, one extra copy), ``index``: ``unshard_index(...)``; ``dim``: the
    per-rank sequence dim. Returns the per-rank shape with ``S`` along ``dim``."""
    if not isinstance(gathered, torch.Tensor):
        if not gathered:
            raise ValueError("gathered must hold at least one rank's shard")
        gathered = torch.stack(list(gathered))  # [cp, *per_rank]
    return Unshard.apply(gathered, index, dim)


def merge_shard(text_shard, video, src_index):
    """Text shard ``[*lead, H]`` with video rows ``[V, H]`` merged in at ``src_index`` ``[*lead]``."""
    return MergeShard.apply(text_shard, video, src_index)
