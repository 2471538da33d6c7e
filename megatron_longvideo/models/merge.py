"""Merge video embeddings into the text embedding sequence at the video placeholder tokens."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

__all__ = ["MergedBatch", "merge_video_tokens", "count_placeholders"]


@dataclasses.dataclass
class MergedBatch:
    """The LLM input of a micro-batch with its videos in place."""

    embeds: torch.Tensor
    """``[b, S, h]`` merged embeddings."""
    video_mask: torch.Tensor
    """``[b, S]`` bool, True at video positions."""
    position_ids: torch.Tensor
    """``[b, S]`` RoPE positions (0..S-1 per sample)."""


def count_placeholders(input_ids: torch.Tensor, video_token_id: int) -> torch.Tensor:
    """``[b]`` number of video placeholder tokens per sample."""
    return (input_ids == video_token_id).sum(dim=1)


def merge_video_tokens(
    text_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    videos: Sequence[Sequence[torch.Tensor]],
    video_token_id: int,
) -> MergedBatch:
    """Scatter each sample's video embeddings over its placeholder tokens, in order.

    ``text_embeds`` ``[b, S, h]``, ``input_ids`` ``[b, S]``, ``videos[i]`` the embeddings
    ``[n_ij, h]`` of sample i's videos in text order. A sample's placeholder count must equal the sum
    of its videos' token counts. Differentiable in both the text and the video embeddings.
    """
    b, s, h = text_embeds.shape
    if input_ids.shape != (b, s):
        raise ValueError(f"input_ids shape {tuple(input_ids.shape)} does not match text_embeds [b, S] = {(b, s)}")
    if len(videos) != b:
        raise ValueError(f"videos: got video lists for {len(videos)} samples, the batch has {b}")
    mask = input_ids == video_token_id  # [b, S]
    counts = mask.sum(dim=1).tolist()  # a device sync per micro-batch: the check below needs the counts
    rows = []
    for i in range(b):
        given = sum(int(v.shape[0]) for v in videos[i])
        if counts[i] != given:
            raise ValueError(
                f"sample {i}: the text has {counts[i]} video placeholder tokens (id {video_token_id}) but its "
                f"{len(videos[i])} video(s) give {given} embeddings (frames x tokens_per_frame, + 1 newline each)"
            )
        for v in videos[i]:
            if v.dim() != 2 or v.shape[1] != h:
                raise ValueError(f"sample {i}: a video embedding has shape {tuple(v.shape)}, expected [n, {h}]")
        if given:
            source = torch.cat([v.to(text_embeds.dtype) for v in videos[i]], dim=0)  # [n_i, h]
            rows.append(text_embeds[i].masked_scatter(mask[i][:, None], source))
        else:
            rows.append(text_embeds[i])
    position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
    return MergedBatch(embeds=torch.stack(rows), video_mask=mask, position_ids=position_ids)
