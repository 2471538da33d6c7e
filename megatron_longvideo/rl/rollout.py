"""Rollout phase of a GRPO step: prompt embeddings from the cached video embeddings, generation divided
among the ranks of each model replica, and the completions shared with all of them.

Every rank of a data-parallel replica (its TP x CP ranks) holds the same prompts. All of them take
part in the collectives that build the prompt embeddings (parallel encoding, TP word embeddings) and
the weight sync. Who generates (:func:`agree_rollout_split`, once at start):

* every rank holds an engine: the step's ``prompts x G`` responses are divided into contiguous, nearly
  equal shares, one per rank of the replica (an engine that ``shards_over_tp``, the ``megatron`` engine,
  runs on the TP ranks together: one share per CP rank); each rank draws its share, then the shares are
  gathered in a fixed order. Every response has its own seed
  (:func:`~megatron_longvideo.rl.engines.decode.response_seed` of the step's base seed, its prompt and its
  index), so the tokens equal those one rank drawing everything produces;
* only the replica's first rank holds one: it draws everything and broadcasts the token ids.

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
from megatron_longvideo.rl.engines.decode import group_seeds

__all__ = ["RLPrompt", "rollout_view", "video_token_count", "placeholder_runs", "RolloutSplit", "agree_rollout_split", "prompt_videos", "prompt_embeddings", "video_prompts",
           "is_replica_leader", "generate_groups", "response_shares", "ROLLOUT_SECONDS_PER_FRAME"]


@dataclasses.dataclass
class RLPrompt:
    """One RL prompt: its visual inputs, the tokenized prompt (placeholders expanded) and its truth."""

    videos: tuple
    """Each visual input's ``[T_i, 3, H, W]`` normalised frames, in prompt order (an image: one frame;
    empty: a text-only prompt)."""
    prompt_ids: torch.Tensor
    """``[P]`` prompt token ids, one placeholder run per visual input included."""
    ground_truth: object
    """What the rewards score against (``rl.rewards.GroundTruth``)."""
    content_ids: tuple = ()
    """Identity of each visual input's content for the embedding cache (file hash or frames hash)."""
    sample_id: str = ""
    """Record id, for logs."""
    seconds_per_frame: Optional[tuple] = None
    """Each video's frame spacing in seconds, for multimodal RoPE's time axis (None, or a None entry: the
    default 0.5 s)."""

    def __post_init__(self):
        self.videos = tuple(self.videos)
        self.content_ids = tuple(self.content_ids)
        if len(self.content_ids) != len(self.videos):
            raise ValueError(f"prompt {self.sample_id!r}: {len(self.content_ids)} content_ids for "
                             f"{len(self.videos)} visual inputs")
        if self.seconds_per_frame is not None:
            self.seconds_per_frame = tuple(self.seconds_per_frame)
            if len(self.seconds_per_frame) != len(self.videos):
                raise ValueError(f"prompt {self.sample_id!r}: {len(self.seconds_per_frame)} seconds_per_frame "
                                 f"for {len(self.videos)} visual inputs")

    def spacing(self, k: int) -> float:
        """Video ``k``'s frame spacing in seconds (the default 0.5 s when not given)."""
        given = None if self.seconds_per_frame is None else self.seconds_per_frame[k]
        return ROLLOUT_SECONDS_PER_FRAME if given is None else float(given)

    @property
    def num_frames(self) -> int:
        """Frames of all visual inputs together."""
        return sum(int(v.shape[0]) for v in self.videos)


def video_token_count(cfg, frames: torch.Tensor) -> int:
    """Placeholder tokens of a video ``[T, 3, H, W]`` for the policy config ``cfg`` (either family)."""
    from megatron_longvideo.models import family_of

    if family_of(cfg) == "qwen2_5_vl":
        return cfg.num_video_tokens(frames.shape[0], frames.shape[-2], frames.shape[-1])
    return cfg.vision.num_video_tokens(frames.shape[0])


def placeholder_runs(ids: torch.Tensor, token_id: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each contiguous run of ``token_id`` in ``ids`` ``[P]``, in order."""
    hits = (ids == token_id).nonzero()[:, 0].tolist()
    runs: list[list[int]] = []
    for i in hits:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [tuple(r) for r in runs]


def rollout_view(prompt: RLPrompt, cfg, max_frames: int) -> RLPrompt:
    """``prompt`` as the rollouts see it with at most ``max_frames`` frames per video (``--rollout-max-frames``):
    frames taken uniformly (a multiple of the tower's temporal patch, Qwen2.5-VL), each video's placeholder run
    shrunk to match, its frame spacing stretched so the view spans the same time, and its own cache
    identity. A prompt whose videos are all within the bound is returned as it is. Training passes keep the
    full prompt; the trainer-old / engine ratio (TIS) corrects for the difference."""
    from megatron_longvideo.data.sampling import uniform_frame_indices

    step = getattr(cfg.vision, "temporal_patch_size", 1)
    keep = max(step, max_frames // step * step)
    if all(v.shape[0] <= keep for v in prompt.videos):
        return prompt
    ids = prompt.prompt_ids
    runs = placeholder_runs(ids, cfg.video_token_id)
    expected = [video_token_count(cfg, v) for v in prompt.videos]
    if [end - start for start, end in runs] != expected:
        raise ValueError(f"prompt {prompt.sample_id!r}: expected one run of video tokens per visual input, of "
                         f"{expected} tokens, found runs of {[end - start for start, end in runs]}")
    pieces, videos, content, spacing, last = [], [], [], [], 0
    for k, (video, (start, end)) in enumerate(zip(prompt.videos, runs)):
        num = video.shape[0]
        if num > keep:
            video_k = video[uniform_frame_indices(num, keep)]
            content.append(f"{prompt.content_ids[k]}@rollout{keep}of{num}")
            spacing.append(prompt.spacing(k) * num / keep)
        else:
            video_k = video
            content.append(prompt.content_ids[k])
            spacing.append(None if prompt.seconds_per_frame is None else prompt.seconds_per_frame[k])
        pieces += [ids[last:start], torch.full((video_token_count(cfg, video_k),), cfg.video_token_id, dtype=ids.dtype)]
        videos.append(video_k)
        last = end
    pieces.append(ids[last:])
    return dataclasses.replace(prompt, videos=tuple(videos), prompt_ids=torch.cat(pieces), content_ids=tuple(content),
                               seconds_per_frame=tuple(spacing))


def is_replica_leader(groups: ParallelGroups) -> bool:
    """True on the first rank of this data-parallel replica (TP rank 0 and CP rank 0)."""
    return groups.rank(groups.tp_cp) == 0


@dataclasses.dataclass(frozen=True)
class RolloutSplit:
    """How the ranks of a replica divide the rollouts (the same on all of them)."""

    shares: int
    """How many shares the responses are divided into (1: the replica's first rank draws all; 0: no rank
    holds an engine)."""
    index: Optional[int]
    """This rank's share (None: it draws none and waits)."""
    takes_video_prompts: bool = False
    """The engine takes :class:`VideoPrompt` objects (every rank builds the same rollout inputs)."""
    needs_weights: bool = False
    """Some rank's engine holds its own copy of the weights (every rank then takes part in the sync's gather);
    False for engines that run on the policy itself (``megatron``)."""


def agree_rollout_split(groups: ParallelGroups, engine) -> RolloutSplit:
    """Who generates, agreed over the replica's ranks (a collective, once at start): every rank when every
    rank holds an engine (by CP rank for an engine that ``shards_over_tp``), else the first rank alone, which
    must then hold one. Raises ValueError naming the ranks when the engines disagree."""
    mine = (engine is not None, bool(getattr(engine, "shards_over_tp", False)),
            bool(getattr(engine, "takes_video_prompts", False)),
            engine is not None and bool(getattr(engine, "needs_weight_sync", True)))
    size = groups.size(groups.tp_cp)
    every = [mine] * size
    if size > 1:
        every = [None] * size
        dist.all_gather_object(every, mine, group=groups.tp_cp)
    held = [e[0] for e in every]
    if not any(held):
        return RolloutSplit(shares=0, index=None)
    tp_sharded, videos, weights = every[held.index(True)][1:]
    if all(held):
        kinds = {e[1:] for e in every}
        if len(kinds) > 1:
            raise ValueError(f"rollout engines: the replica's ranks hold different kinds of engine {every}")
        if tp_sharded:
            return RolloutSplit(shares=groups.size(groups.cp), index=groups.cp_rank, takes_video_prompts=videos,
                                needs_weights=weights)
        return RolloutSplit(shares=size, index=groups.rank(groups.tp_cp), takes_video_prompts=videos, needs_weights=weights)
    if held[0] and not any(held[1:]):
        if tp_sharded and groups.size(groups.tp) > 1:
            raise ValueError("rollout engines: an engine that shards over TP needs one on every TP rank")
        return RolloutSplit(shares=1, index=0 if is_replica_leader(groups) else None, takes_video_prompts=videos,
                            needs_weights=weights)
    ranks = dist.get_process_group_ranks(groups.tp_cp) if size > 1 else [0]
    raise ValueError("rollout engines: give every rank of a replica an engine (each draws a share of the responses) "
                     f"or its first rank only; ranks {[r for r, h in zip(ranks, held) if h]} of {ranks} hold one")


def response_shares(num_prompts: int, group_size: int, shares: int) -> list[list[tuple[int, list[int]]]]:
    """The responses of ``num_prompts`` prompts x ``group_size`` divided into ``shares`` contiguous, nearly
    equal shares: ``[share][(prompt, [response indices])]`` (a share may be empty)."""
    total = num_prompts * group_size
    out = []
    for w in range(shares):
        start, end = w * total // shares, (w + 1) * total // shares
        pieces: list[tuple[int, list[int]]] = []
        for j in range(start, end):
            i, r = divmod(j, group_size)
            if pieces and pieces[-1][0] == i:
                pieces[-1][1].append(r)
            else:
                pieces.append((i, [r]))
        out.append(pieces)
    return out


def prompt_videos(model, groups: ParallelGroups, prompts: Sequence[RLPrompt], *, cache=None, cache_keys=None):
    """Per prompt, the ``[N_ij, h]`` embeddings of each of its visual inputs (encoded over the encode group in
    one call, or from the cache), on every rank of the replica. ``cache_keys``: per prompt, one key per input."""
    flat = [v for p in prompts for v in p.videos]
    keys = None if cache_keys is None else [k for ks in cache_keys for k in ks]
    encoded = encode_videos(unwrap(model).vision, flat, groups, cache=cache, keys=keys) if flat else []
    out, offset = [], 0
    for p in prompts:
        out.append(list(encoded[offset : offset + len(p.videos)]))
        offset += len(p.videos)
    return out


def prompt_embeddings(model, groups: ParallelGroups, prompts: Sequence[RLPrompt], *, cache=None, cache_keys=None):
    """``[P_i, h]`` merged video+text embeddings of each prompt, on every rank of the replica."""
    inner = unwrap(model)
    videos = prompt_videos(model, groups, prompts, cache=cache, cache_keys=cache_keys)
    device = device_of(inner)
    out = []
    for p, embeds in zip(prompts, videos):
        ids = p.prompt_ids[None].to(device)  # [1, P]
        merged = merge_video_tokens(text_embeddings(model, ids), ids, [embeds], inner.cfg.video_token_id)
        out.append(merged.embeds[0])
    return out


def video_prompts(cfg, prompts: Sequence[RLPrompt], videos: Sequence[Sequence[torch.Tensor]],
                  keys: Optional[Sequence[Sequence[str]]] = None) -> list[VideoPrompt]:
    """The prompts of a Qwen2.5-VL policy (config ``cfg``) as token ids with their videos' embeddings
    ``videos[i]`` (per visual input ``[N_ij, h]``, :func:`prompt_videos`), grids and time steps; ``keys``: the
    videos' cache keys."""
    from megatron_longvideo.models.qwen2_5_vl.model import video_grid

    patch = cfg.vision.temporal_patch_size  # seconds per temporal patch: the frames' spacing x frames per patch
    return [VideoPrompt(prompt_ids=p.prompt_ids, videos=tuple(v), grids=tuple(tuple(video_grid(cfg, f)) for f in p.videos),
                        seconds_per_grid=tuple(p.spacing(k) * patch for k in range(len(p.videos))),
                        keys=() if keys is None else tuple(keys[i]))
            for i, (p, v) in enumerate(zip(prompts, videos))]


def generate_groups(engine, groups: ParallelGroups, embeds: Optional[Sequence[torch.Tensor]], sampling,
                    positions: Optional[Sequence[torch.Tensor]] = None,
                    video_prompts: Optional[Sequence[VideoPrompt]] = None, *, return_logprobs: bool = False,
                    split: Optional[RolloutSplit] = None):
    """Sampled token ids, ``[prompt][response]``, identical on every rank of the replica. ``positions``:
    the prompts' multimodal RoPE positions ``[3, P_i]`` (a Qwen2.5-VL policy), for the engine.
    ``video_prompts`` (in place of ``embeds``): for an engine with ``takes_video_prompts``. ``split``: who
    draws which responses (:func:`agree_rollout_split`; None: the replica's first rank draws all). With
    ``return_logprobs`` (``sampling.logprobs`` on): ``(token ids, the engine's log-probs of them)``, the
    log-probs ``[prompt][response]`` lists of floats (None where the engine gave none)."""
    if split is None:
        split = RolloutSplit(shares=1, index=0 if is_replica_leader(groups) else None)
    if split.shares == 0:
        raise RuntimeError("rollouts: no rank of the replica holds a rollout engine")
    inputs = video_prompts if video_prompts is not None else embeds
    num_prompts, g = len(inputs), sampling.n
    drawn: list = []  # (prompt, response, token ids, log-probs) of this rank's share
    if split.index is not None:
        pieces = response_shares(num_prompts, g, split.shares)[split.index]
        if pieces:
            chosen = [i for i, _ in pieces]
            seeds = [group_seeds(sampling, i, rs) for i, rs in pieces]
            if video_prompts is not None:
                completions = engine.generate_videos([video_prompts[i] for i in chosen], sampling, seeds=seeds)
            else:
                extra = {} if positions is None else {"positions": [positions[i] for i in chosen]}
                completions = engine.generate([embeds[i].detach().float() for i in chosen], sampling, seeds=seeds, **extra)
            for (i, rs), group in zip(pieces, completions):
                if len(group) != len(rs):
                    raise RuntimeError(f"rollout engine: {len(group)} completions of prompt {i}, asked for {len(rs)}")
                drawn.extend((i, r, list(c.token_ids), None if c.logprobs is None else list(c.logprobs))
                             for r, c in zip(rs, group))
    shares = [drawn]
    if groups.size(groups.tp_cp) > 1:
        shares = [None] * groups.size(groups.tp_cp)
        dist.all_gather_object(shares, drawn, group=groups.tp_cp)
    tokens: list[list] = [[None] * g for _ in range(num_prompts)]
    logprobs: list[list] = [[None] * g for _ in range(num_prompts)]
    for share in shares:  # TP ranks of a TP-sharded engine report the same responses: the same values
        for i, r, ids, lp in share:
            tokens[i][r], logprobs[i][r] = ids, lp
    missing = [(i, r) for i in range(num_prompts) for r in range(g) if tokens[i][r] is None]
    if missing:
        raise RuntimeError(f"rollouts: no rank drew responses {missing[:4]} ({len(missing)} missing)")
    return (tokens, logprobs) if return_logprobs else tokens


def nonempty(token_ids: list[int], fallback: int) -> list[int]:
    """A response must have one token at least (an engine may stop immediately)."""
    return token_ids if token_ids else [fallback]
