"""Index math for padding and sharding a merged sequence across context-parallel (CP) ranks.

Layout (Megatron's load-balanced, "zigzag" CP order): a sequence of length ``seq_len`` is padded to
``P = padded_length(seq_len, cp_size, multiple)``, a multiple of ``2 * cp_size * multiple`` (``multiple``
is the TP size when Megatron sequence parallelism is on, else 1), and cut into ``2 * cp_size`` chunks of
``c = P / (2 * cp_size)`` positions. CP rank ``r`` holds chunks ``r`` and ``2 * cp_size - 1 - r``, in that
order, so ``s_local = 2 * c``. Under a causal mask this balances the attention work across ranks.

A batch of unequal samples is padded per sample to one common length (layout ``[b, s]`` or
``[s, b, h]`` plus a mask), not packed as THD: our CP core attention without TransformerEngine works on
dense ``[s, b, h]`` tensors with masks, and THD packing only pays off with TE's varlen kernels.
So every sample of a batch shares one ``seq_len`` here, and the positions below apply to all of them.

Everything here is pure index math: LongTensors on a given device, no collectives.
"""

import torch

PAD = -1  # shard_positions: padding position
TEXT = -1  # merge_source_index: keep the text row at this local position
ZERO = -2  # merge_source_index: padding row, filled with zeros


def _check_layout(seq_len, cp_size, multiple, cp_rank=None):
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    if not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"cp_size must be an int >= 1, got {cp_size!r}")
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be an int >= 1, got {multiple!r}")
    if cp_rank is not None and (not isinstance(cp_rank, int) or not 0 <= cp_rank < cp_size):
        raise ValueError(f"cp_rank must be an int in [0, cp_size={cp_size}), got {cp_rank!r}")


def padded_length(seq_len: int, cp_size: int, multiple: int = 1) -> int:
    """``seq_len`` rounded up to a multiple of ``2 * cp_size * multiple``."""
    _check_layout(seq_len, cp_size, multiple)
    unit = 2 * cp_size * multiple
    return -(-seq_len // unit) * unit


def local_length(seq_len: int, cp_size: int, multiple: int = 1) -> int:
    """Positions per CP rank: ``padded_length / cp_size`` (two chunks)."""
    return padded_length(seq_len, cp_size, multiple) // cp_size


def shard_positions(seq_len, cp_size, cp_rank, multiple=1, device=None) -> torch.Tensor:
    """Global positions held by ``cp_rank`` in local order; ``-1`` where the position is padding.

    Returns a LongTensor ``[s_local]``.
    """
    _check_layout(seq_len, cp_size, multiple, cp_rank)
    chunk = padded_length(seq_len, cp_size, multiple) // (2 * cp_size)
    local = torch.arange(2 * chunk, device=device)  # [s_local]
    second = (local >= chunk).long()
    chunk_id = cp_rank + second * (2 * cp_size - 1 - 2 * cp_rank)
    pos = chunk_id * chunk + local - second * chunk
    return torch.where(pos < seq_len, pos, torch.full_like(pos, PAD))


def all_shard_positions(seq_len, cp_size, multiple=1, device=None) -> torch.Tensor:
    """``shard_positions`` of every rank, concatenated rank-major: LongTensor ``[cp_size * s_local]``."""
    return torch.cat([shard_positions(seq_len, cp_size, r, multiple, device) for r in range(cp_size)])


def unshard_index(seq_len, cp_size, multiple=1, device=None) -> torch.Tensor:
    """For each original position ``p``, its row in the rank-major gathered ``[cp_size * s_local]`` buffer.

    ``gathered.view(cp_size * s_local, ...)[unshard_index(...)]`` restores the order and drops padding.
    Returns a LongTensor ``[seq_len]``.
    """
    _check_layout(seq_len, cp_size, multiple)
    chunk = padded_length(seq_len, cp_size, multiple) // (2 * cp_size)
    pos = torch.arange(seq_len, device=device)  # [seq_len]
    chunk_id, offset = pos // chunk, pos % chunk
    second = chunk_id >= cp_size
    rank = torch.where(second, 2 * cp_size - 1 - chunk_id, chunk_id)
    return rank * (2 * chunk) + second.long() * chunk + offset


def inverse_index(index: torch.Tensor, size: int) -> torch.Tensor:
    """``inv[index[i]] = i`` for ``index[i] >= 0``; ``-1`` for rows that ``index`` never names.

    ``index`` must not repeat a non-negative value. Returns a LongTensor ``[size]``.
    """
    inv = torch.full((size,), -1, dtype=torch.long, device=index.device)
    keep = index >= 0
    inv[index[keep]] = torch.arange(index.numel(), device=index.device)[keep]
    return inv


def _check_mask(video_mask, dims, num_video):
    if not isinstance(video_mask, torch.Tensor) or video_mask.dtype != torch.bool:
        raise ValueError("video_mask must be a bool tensor")
    if video_mask.dim() != dims:
        raise ValueError(f"video_mask must have {dims} dim(s), got shape {tuple(video_mask.shape)}")
    if num_video is not None:
        count = int(video_mask.sum())
        if count != num_video:
            raise ValueError(f"video_mask has {count} video positions but num_video={num_video} rows")


def merge_source_index(video_mask, cp_size, cp_rank, multiple=1, num_video=None) -> torch.Tensor:
    """Source code of each local position of ``cp_rank``'s shard of the merged sequence.

    ``video_mask``: bool ``[S]``, True at video placeholder positions. Codes, LongTensor ``[s_local]``:
    ``k >= 0``: row ``k`` of the video embeddings (``k`` = how many video positions precede it);
    ``-1``: keep the text embedding row at this local position; ``-2``: padding (zeros).
    ``num_video``, when given, must equal the number of video positions.
    """
    _check_mask(video_mask, 1, num_video)
    seq_len = video_mask.numel()
    pos = shard_positions(seq_len, cp_size, cp_rank, multiple, video_mask.device)  # [s_local]
    video_row = torch.cumsum(video_mask.long(), 0) - 1  # [S]
    code = torch.where(video_mask, video_row, torch.full_like(video_row, TEXT))  # [S]
    return torch.where(pos >= 0, code[pos.clamp(min=0)], torch.full_like(pos, ZERO))


def merge_source_index_batched(
    video_mask, cp_size, cp_rank, multiple=1, num_video=None, seq_lens=None
) -> torch.Tensor:
    """Batched ``merge_source_index``: ``video_mask`` bool ``[b, S]`` -> LongTensor ``[b, s_local]``.

    Video rows index one ``[V_total, H]`` tensor holding the samples' videos back to back, so the rows of
    sample ``i`` are offset by the video count of samples ``< i``. ``seq_lens`` (``[b]``, optional): the
    true length of each sample; its positions ``>= seq_lens[i]`` become padding (``-2``) like the tail
    padding, and must hold no video. For the ``[s, b, h]`` layout, pass ``.t().contiguous()`` of the
    result to ``merge_shard``.
    """
    _check_mask(video_mask, 2, num_video)
    batch, seq_len = video_mask.shape
    pos = shard_positions(seq_len, cp_size, cp_rank, multiple, video_mask.device)  # [s_local]
    video_row = torch.cumsum(video_mask.reshape(-1).long(), 0).view(batch, seq_len) - 1  # [b, S]
    code = torch.where(video_mask, video_row, torch.full_like(video_row, TEXT))  # [b, S]
    if seq_lens is not None:
        seq_lens = torch.as_tensor(seq_lens, device=video_mask.device)
        if seq_lens.shape != (batch,):
            raise ValueError(f"seq_lens must have shape [{batch}], got {tuple(seq_lens.shape)}")
        tail = torch.arange(seq_len, device=video_mask.device) >= seq_lens[:, None]  # [b, S]
        if bool((tail & video_mask).any()):
            raise ValueError("video_mask has video positions at or past seq_lens")
        code = code.masked_fill(tail, ZERO)
    out = code[:, pos.clamp(min=0)]  # [b, s_local]
    return out.masked_fill(pos < 0, ZERO)
