"""Rollout phase of a GRPO step: prompt embeddings from the cached video embeddings, generation on one
rank per model replica, and the completions shared with the replica's other ranks.

Every rank of a data-parallel replica (its TP x CP ranks) holds the same prompts. All of them take
part in the collectives that build the prompt embeddings (parallel encoding, TP word embeddings) and
the weight gather; only the replica's first rank runs the engine, then broadcasts the token ids.

An engine that merges and positions the video tokens itself (``takes_video_prompts``: vLLM's Qwen2.5-VL)
gets :func:`video_prompts` instead of merged embeddings: the token ids and the cached video embeddings
(:func:`prompt_videos`), without the text embedding and the merge.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_longvideo.models.encode import encode_videos
from megatron_longvideo.models.llm import unwrap
from megatron_longvideo.models.merge import merge_video_tokens
# RL prompts carry no timestamps: their frames are taken as far apart as the policy's positions take them
from megatron_longvideo.models.qwen2_5_vl.model import DEFAULT_SECONDS_PER_FRAME as ROLLOUT_SECONDS_PER_FRAME
from megatron_longvideo.models.vlm import text_embeddings
from megatron_longvideo.parallel.groups import ParallelGroups
from megatron_longvideo.platform.device import device_of
from megatron_longvideo.rl.engines.base import VideoPrompt

__all__ = ["RLPrompt", "prompt_videos", "prompt_embeddings", "video_prompts", "is_replica_leader", "generate_groups",
           "ROLLOUT_SECONDS_PER_FRAME"]


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


def prompt_videos(model, groups: ParallelGroups, prompts: Sequence[RLPrompt], *, cache=None, cache_keys=None):
    """``[N_i, h]`` video embeddings of each prompt (encoded over the encode group, or from the cache), on
    every rank of the replica."""
    return encode_videos(unwrap(model).vision, [p.frames for p in prompts], groups, cache=cache, keys=cache_keys)


def prompt_embeddings(model, groups: ParallelGroups, prompts: Sequence[RLPrompt], *, cache=None, cache_keys=None):
    """``[P_i, h]`` merged video+text embeddings of each prompt, on every rank of the replica."""
    inner = unwrap(model)
    videos = prompt_videos(model, groups, prompts, cache=cache, cache_keys=cache_keys)
    device = videos[0].device if videos else device_of(inner)
    out = []
    for p, video in zip(prompts, videos):
        ids = p.prompt_ids[None].to(device)  # [1, P]
        merged = merge_video_tokens(text_embeddings(model, ids), ids, [[video]], inner.cfg.video_token_id)
        out.append(merged.embeds[0])
    return out


def video_prompts(cfg, prompts: Sequence[RLPrompt], videos: Sequence[torch.Tensor],
                  keys: Optional[Sequence[str]] = None) -> list[VideoPrompt]:
    """The prompts of a Qwen2.5-VL policy (config ``cfg``) as token ids with their videos' embeddings
    ``videos[i]`` ``[N_i, h]`` (:func:`prompt_videos`), grids and time steps; ``keys``: the videos' cache keys."""
    from megatron_longvideo.models.qwen2_5_vl.model import video_grid

    step = ROLLOUT_SECONDS_PER_FRAME * cfg.vision.temporal_patch_size  # seconds per temporal patch
    return [VideoPrompt(prompt_ids=p.prompt_ids, videos=(v,), grids=(tuple(video_grid(cfg, p.frames)),),
                        seconds_per_grid=(step,), keys=() if keys is None else (keys[i],))
            for i, (p, v) in enumerate(zip(prompts, videos))]


def generate_groups(engine, groups: ParallelGroups, embeds: Optional[Sequence[torch.Tensor]], sampling,
                    positions: Optional[Sequence[torch.Tensor]] = None,
                    video_prompts: Optional[Sequence[VideoPrompt]] = None, *, return_logprobs: bool = False):
    """Sampled token ids, ``[prompt][response]``, identical on every rank of the replica. ``positions``:
    the prompts' multimodal RoPE positions ``[3, P_i]`` (a Qwen2.5-VL policy), for the engine.
    ``video_prompts`` (in place of ``embeds``): for an engine with ``takes_video_prompts``. With
    ``return_logprobs`` (``sampling.logprobs`` on): ``(token ids, the engine's log-probs of them)``, the
    log-probs ``[prompt][response]`` lists of floats (None where the engine gave none)."""
    payload: list = [None]
    if is_replica_leader(groups):
        if video_prompts is not None:
            completions = engine.generate_videos(video_prompts, sampling)
        else:
            extra = {} if positions is None else {"positions": positions}
            completions = engine.generate([e.detach().float() for e in embeds], sampling, **extra)
        payload[0] = ([[list(c.token_ids) for c in group] for group in completions],
                      [[None if c.logprobs is None else list(c.logprobs) for c in group] for group in completions])
    if groups.size(groups.tp_cp) > 1:
        leader = dist.get_process_group_ranks(groups.tp_cp)[0]
        dist.broadcast_object_list(payload, src=leader, group=groups.tp_cp)
    return payload[0] if return_logprobs else payload[0][0]


def nonempty(token_ids: list[int], fallback: int) -> list[int]:
    """A response must have one token at least (an engine may stop immediately)."""
    return token_ids if token_ids else [fallback]
