"""Pure-torch oracles for the shard / unshard / merge kernels (autograd flows through them).

Index conventions are those of ``kernels.index``: shard positions use ``-1`` for padding; merge source
codes are ``k >= 0`` (video row k), ``-1`` (keep the text row), ``-2`` (padding, zeros).
"""

import torch

from .index import TEXT


def _check_dim(x, dim, name):
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for {name} of shape {tuple(x.shape)}")
    return dim % x.dim()


def shard(x, positions, dim=0, pad_value=0):
    """Gather ``x`` along ``dim`` at ``positions`` (``[s_local]``); ``-1`` gives ``pad_value``.

    forward: ``out.select(dim, i) = x.select(dim, positions[i])`` or ``pad_value``.
    backward: scatter the grad back to the positions; padding rows give no grad.
    """
    dim = _check_dim(x, dim, "x")
    if positions.dim() != 1:
        raise ValueError(f"positions must be 1-D, got shape {tuple(positions.shape)}")
    if positions.numel() and int(positions.max()) >= x.shape[dim]:
        raise ValueError(f"positions name row {int(positions.max())} but x has {x.shape[dim]} along dim")
    out = x.index_select(dim, positions.clamp(min=0))  # [..., s_local, ...]
    pad = (positions < 0).view([-1 if d == dim else 1 for d in range(x.dim())])
    return out.masked_fill(pad, pad_value)


def unshard(gathered, index, dim=0):
    """Restore original order from every rank's shard and drop padding.

    ``gathered``: a tensor ``[cp, *per_rank]`` or a list of ``cp`` per-rank tensors, each with its
    ``s_local`` positions along ``dim``; ``index``: ``unshard_index(...)`` ``[S]``.
    Returns the per-rank shape with ``S`` along ``dim``.
    forward: ``cat(gathered, dim).index_select(dim, index)``; backward: every rank's shard of the grad.
    """
    parts = list(gathered.unbind(0)) if isinstance(gathered, torch.Tensor) else list(gathered)
    if not parts:
        raise ValueError("gathered must hold at least one rank's shard")
    dim = _check_dim(parts[0], dim, "gathered[0]")
    flat = torch.cat(parts, dim)  # [..., cp * s_local, ...]
    if index.numel() and int(index.max()) >= flat.shape[dim]:
        raise ValueError(f"index names row {int(index.max())} but gathered has {flat.shape[dim]} rows")
    return flat.index_select(dim, index)


def _check_merge(text_shard, video, src_index):
    if video.dim() != 2 or video.shape[1] != text_shard.shape[-1]:
        raise ValueError(
            f"video must be [V, {text_shard.shape[-1]}] to match text_shard, got {tuple(video.shape)}"
        )
    if video.dtype != text_shard.dtype:
        raise ValueError(f"video dtype {video.dtype} differs from text_shard dtype {text_shard.dtype}")
    if src_index.shape != text_shard.shape[:-1]:
        raise ValueError(
            f"src_index shape {tuple(src_index.shape)} must be text_shard's leading shape "
            f"{tuple(text_shard.shape[:-1])}"
        )


def merge_shard(text_shard, video, src_index):
    """Merge video embeddings into a padded text shard.

    ``text_shard``: ``[*lead, H]`` (``[s_local, H]``, batched ``[b, s_local, H]`` or ``[s_local, b, H]``);
    ``video``: ``[V, H]`` (all samples' videos back to back); ``src_index``: ``[*lead]`` codes.
    forward: ``out[i] = video[k]`` if ``k = src_index[i] >= 0``, ``text_shard[i]`` if ``-1``, else 0.
    backward: ``merge_shard_backward``.
    """
    _check_merge(text_shard, video, src_index)
    hidden = text_shard.shape[-1]
    code = src_index.reshape(-1)  # [n]
    text = text_shard.reshape(-1, hidden)  # [n, h]
    out = text.new_zeros(text.shape)  # [n, h]
    is_text, is_video = code == TEXT, code >= 0
    out[is_text] = text[is_text]
    out[is_video] = video[code[is_video]]
    return out.view(text_shard.shape)


def merge_shard_backward(grad_out, src_index, num_video):
    """Grads of ``merge_shard``: ``(grad_text_shard [*lead, H], grad_video [num_video, H])``.

    Text rows replaced by video and padding rows get zero grad; video rows absent from this shard get
    zero grad. A video row appears at most once per sequence, so each grad row is copied, never
    summed (``src_index`` must not repeat a video row; the CPU kernel checks it).
    """
    hidden = grad_out.shape[-1]
    code = src_index.reshape(-1)  # [n]
    grad = grad_out.reshape(-1, hidden)  # [n, h]
    grad_text = grad.masked_fill((code != TEXT)[:, None], 0)  # [n, h]
    is_video = code >= 0
    grad_video = grad.new_zeros(num_video, hidden)  # [V, h]
    grad_video[code[is_video]] = grad[is_video]
    return grad_text.view(grad_out.shape), grad_video
