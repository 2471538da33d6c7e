"""Multimodal RoPE position ids of Qwen2.5-VL: three rows (temporal, height, width) per token.

Text tokens get equal rows counting up by one. A video of ``(t, h, w)`` patch grids (after the
Conv3d: ``t`` temporal patches, ``h x w`` patches) becomes ``t * (h / m) * (w / m)`` LLM tokens after
the ``m x m`` patch merger, in (t, h, w) order; token ``(i, j, k)`` of a video starting at position
``p`` gets ``(p + floor(i * interval), p + j, p + k)`` with ``interval = tokens_per_second *
second_per_grid_t`` (seconds one temporal patch spans). Images are videos with ``t = 1`` and interval 1.

Where the text after a vision block resumes is where implementations differ:

* ``text_after="max"`` (the Qwen reference code, vLLM, transformers 4.x): one past the largest position
  the block used in any row, so time keeps moving forward for long videos;
* ``text_after="spatial"`` (transformers 5.x): ``p + max(h, w) / m``, ignoring the temporal row.

They agree whenever the temporal row stays below the spatial extent (short clips, still images). The
default is the reference behaviour the published checkpoints were trained with. Pure functions on host
tensors: the step computes positions once per batch, before sharding (see ``cp_shard(dim=-1)``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["vision_position_ids", "mrope_position_ids", "expand_positions"]


def vision_position_ids(start: int, grid_thw: Sequence[int], *, spatial_merge_size: int = 2,
                        interval: float = 1.0) -> torch.Tensor:
    """``[3, t * (h / m) * (w / m)]`` positions of one vision block starting at ``start``."""
    t, h, w = (int(x) for x in grid_thw)
    m = spatial_merge_size
    if h % m or w % m:
        raise ValueError(f"grid {tuple(grid_thw)}: height and width must be multiples of spatial_merge_size={m}")
    gh, gw = h // m, w // m
    temporal = (torch.arange(t, dtype=torch.float32, device="cpu") * interval).long()  # quantised after scaling
    rows = torch.meshgrid(temporal, torch.arange(gh, device="cpu"), torch.arange(gw, device="cpu"), indexing="ij")
    return torch.stack([r.reshape(-1) for r in rows]) + start  # [3, n]


def mrope_position_ids(
    input_ids: torch.Tensor,
    *,
    video_token_id: int,
    video_grid_thw: Optional[torch.Tensor] = None,
    second_per_grid_ts: Optional[Sequence[float]] = None,
    image_token_id: Optional[int] = None,
    image_grid_thw: Optional[torch.Tensor] = None,
    tokens_per_second: float = 2.0,
    spatial_merge_size: int = 2,
    attention_mask: Optional[torch.Tensor] = None,
    text_after: str = "max",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions [3, b, s], deltas [b, 1])`` for ``input_ids [b, s]`` (see the module docstring).

    Each run of consecutive video (image) placeholder tokens takes the next grid of ``video_grid_thw``
    (``image_grid_thw``), in order over the batch; its length must be the grid's token count.
    ``deltas`` = largest position + 1 - length: what decoding adds to the plain token index (the
    "rope delta"). Padding (``attention_mask == 0``) gets position 0 and takes no positions from the rest.
    """
    if text_after not in ("max", "spatial"):
        raise ValueError(f"text_after must be 'max' or 'spatial', got {text_after!r}")
    b, s = input_ids.shape
    grids = {"video": iter(video_grid_thw.tolist()) if video_grid_thw is not None else iter(()),
             "image": iter(image_grid_thw.tolist()) if image_grid_thw is not None else iter(())}
    seconds = iter(second_per_grid_ts if second_per_grid_ts is not None else [])
    positions = torch.zeros(3, b, s, dtype=torch.long, device="cpu")
    deltas = torch.zeros(b, 1, dtype=torch.long, device="cpu")
    m = spatial_merge_size
    for row in range(b):
        keep = torch.ones(s, dtype=torch.bool) if attention_mask is None else attention_mask[row].cpu().bool()
        ids = input_ids[row].cpu()[keep].tolist()
        kinds = ["video" if i == video_token_id else "image" if image_token_id is not None and i == image_token_id
                 else "text" for i in ids]
        parts, current, i = [], 0, 0
        while i < len(ids):
            j = i
            while j < len(ids) and kinds[j] == kinds[i]:
                j += 1
            if kinds[i] == "text":
                parts.append(torch.arange(j - i, device="cpu").expand(3, -1) + current)
                current += j - i
            else:
                grid = next(grids[kinds[i]], None)
                if grid is None:
                    raise ValueError(f"row {row}: a run of {kinds[i]} tokens at {i} has no {kinds[i]}_grid_thw entry left")
                interval = tokens_per_second * float(next(seconds, 1.0)) if kinds[i] == "video" else 1.0
                block = vision_position_ids(current, grid, spatial_merge_size=m, interval=interval)
                if block.shape[1] != j - i:
                    raise ValueError(f"row {row}: {j - i} {kinds[i]} tokens at {i}, but grid {tuple(grid)} makes "
                                     f"{block.shape[1]} after the {m}x{m} merger")
                parts.append(block)
                current = int(block.max()) + 1 if text_after == "max" else current + max(grid[1], grid[2]) // m
            i = j
        row_positions = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
        positions[:, row, keep] = row_positions
        deltas[row, 0] = (int(row_positions.max()) + 1 if row_positions.numel() else 0) - len(ids)
    return positions, deltas


def expand_positions(position_ids: torch.Tensor, prefix_lens: Sequence[int], prefix_positions: Sequence[torch.Tensor],
                     deltas: Sequence[int]) -> torch.Tensor:
    """Three-row positions ``[3, rows, S]`` of prefill rows from their one-row positions ``[rows, S]``
    (:func:`~megatron_longvideo.rl.packing.build_prefill_batch`: the position each token has unpacked).

    Row ``r``'s prefix (one-row position ``p < prefix_lens[r]``) takes ``prefix_positions[r][:, p]``
    (``[3, P_r]``, from :func:`mrope_position_ids` of the prefix); a response token takes ``p + deltas[r]``
    in all three rows, where it would be unpacked: so packed responses get their unpacked positions.
    Padding takes what its one-row position names (it is never attended to)."""
    rows, s = position_ids.shape
    out = torch.empty(3, rows, s, dtype=torch.long, device="cpu")
    for r in range(rows):
        p = position_ids[r].cpu().long()
        prefix = p < int(prefix_lens[r])
        out[:, r] = (p + int(deltas[r]))[None].expand(3, -1)
        out[:, r, prefix] = prefix_positions[r][:, p[prefix]]
    return out
