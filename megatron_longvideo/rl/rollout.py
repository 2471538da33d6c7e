"""Rollout phase of a GRPO step: prompt embeddings from the cached video embeddings, generation on one
rank per model replica, and the completions shared with the replica's other ranks.

Every rank of a data-parallel replica (its TP x CP ranks) holds the same prompts. All of them take
part in the collectives that build the prompt embeddings (parallel encoding, TP word embeddings) and
the weight gather; only the replica's first rank runs the engine, then broadcasts the token ids.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_longvideo.models.encode import encode_videos
from megatron_longvideo.models.llm import unwrap
from megatron_longvideo.models.merge import merge_video_tokens
from megatron_longvideo.models.vlm import text_embeddings
from megatron_longvideo.parallel.groups import ParallelGroups
from megatron_longvideo.platform.device import device_of

__all__ = ["RLPrompt", "prompt_embeddings", "is_replica_leader", "generate_groups"]


@dataclasses.dataclass
class RLPrompt:
    """One RL prompt: its video, the tokenized prompt (video placeholders expanded) and its truth."""

    frames: torch.Tensor
    """``[T, 3, H, W]`` normalised frames."""
    prompt_ids: torch.Tensor
    """``[P]`` prompt token ids, video placeholders included."""
    ground_truth: object
    """What the rewards score against (``rl.rewards.GroundTruth``)."""
    content_id: str
    """Identity of the video's content for the embedding cache (file hash or frames hash)."""
    sample_id: str = ""
    """Record id, for logs."""


def is_replica_leader(groups: ParallelGroups) -> bool:
    """True on the first rank of this data-parallel replica (TP rank 0 and CP rank 0)."""
    return groups.rank(groups.tp_cp) == 0


def prompt_embeddings(model, groups: ParallelGroups, prompts: Sequence[RLPrompt], *, cache=None, cache_keys=None):
    """``[P_i, h]`` merged video+text embeddings of each prompt, on every rank of the replica."""
    inner = unwrap(model)
    videos = encode_videos(inner.vision, [p.frames for p in prompts], groups, cache=cache, keys=cache_keys)
    device = videos[0].device if videos else device_of(inner)
    out = []
    for p, video in zip(prompts, videos):
        ids = p.prompt_ids[None].to(device)  # [1, P]
        merged = merge_video_tokens(text_embeddings(model, ids), ids, [[video]], inner.cfg.video_token_id)
        out.append(merged.embeds[0])
    return out


def generate_groups(engine, groups: ParallelGroups, embeds: Sequence[torch.Tensor], sampling,
                    positions: Optional[Sequence[torch.Tensor]] = None) -> list[list[list[int]]]:
    """Sampled token ids, ``[prompt][response]``, identical on every rank of the replica. ``positions``:
    the prompts' multimodal RoPE positions ``[3, P_i]`` (a Qwen2.5-VL policy), for the engine."""
    payload: list = [None]
    if is_replica_leader(groups):
        extra = {} if positions is None else {"positions": positions}
        completions = engine.generate([e.detach().float() for e in embeds], sampling, **extra)
        payload[0] = [[list(c.token_ids) for c in group] for group in completions]
    if groups.size(groups.tp_cp) > 1:
        leader = dist.get_process_group_ranks(groups.tp_cp)[0]
        dist.broadcast_object_list(payload, src=leader, group=groups.tp_cp)
    return payload[0]


def nonempty(token_ids: list[int], fallback: int) -> list[int]:
    """A response must have one token at least (an engine may stop immediately)."""
    return token_ids if token_ids else [fallback]
