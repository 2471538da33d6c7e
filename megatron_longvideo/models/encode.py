"""MR-SP stage 1: the frames of the videos of a micro-batch encoded in parallel over the encode group.

All ranks of the encode group hold the same micro-batch. Each of its videos (those not served by the
cache) is split on its own into E contiguous slices of ``ceil(T / E)`` frames, the last ones padded with
blank frames (:func:`~megatron_longvideo.data.frames.frame_shard`); rank e encodes slice e of every
video. An autograd all-gather assembles the tokens in frame order on every rank and the blank frames'
tokens are dropped. A video may be a :class:`~megatron_longvideo.data.frames.LazyFrames`: then each rank
decodes only its slice (stage 1 starts at the decoder), a cached video is not decoded at all, and a
slice that fails to decode raises the same ``VideoDecodeError`` on every rank of the replica (one small
all-reduce) instead of leaving the others waiting in the gather.

The unit that is split is a frame for the SigLIP tower. A tower whose attention spans several frames
says so with two methods: ``video_units(video) -> [units, ...]`` (Qwen2.5-VL: one temporal patch of two
frames, its patches in merge-block order) and ``encode_units(units) -> [units, tokens, hidden]``; its
``per_frame_parameters()`` are what the gather's gradients reach. Splitting by units is exact exactly
when no attention crosses a unit. A tower whose input is already its units (the Qwen2-Audio tower: one
30 s window of log-mel features per unit) takes them one per "frame" (``cfg`` without
``temporal_patch_size``), and one whose last unit may be partly padding says how many of its tokens are
real with ``num_real_tokens(video) -> int`` (the rest are dropped, before the cache).

Gradients. Backward of the gather sums, for each rank's slice, the gradient every rank computed for
it: ranks of the group in different CP positions hold different parts of the loss, and the sum is the
full gradient. When the group also spans TP, the TP ranks of one CP position are replicas holding the
same loss part, so the sum is scaled by 1/TP. Each rank's tower gradient then covers its own frames
only: :func:`reduce_encode_replica_grads` sums the tower and projector gradients over the TP part of
the group (DDP already sums over DP x CP), keeping every replica of the tower identical. With
``encode_group="cp"`` the TP ranks of a CP position encode the same units: a tower that is replicated
then (SigLIP) computes identical gradients on them, and the Qwen2.5-VL tower is sharded over TP instead
(its TP layers do their own reductions); nothing is summed here in either case.
"""

from __future__ import annotations

from typing import Optional, Sequence

import dataclasses
import time

import torch
import torch.distributed as dist

from megatron_longvideo.data.errors import VideoDecodeError
from megatron_longvideo.data.frames import FrameShard, agree_on_shard_errors, frame_shard, is_lazy, shard_failure
from megatron_longvideo.models.video_cache import VideoEmbeddingCache
from megatron_longvideo.parallel import collectives
from megatron_longvideo.parallel.groups import ParallelGroups
from megatron_longvideo.platform.device import device_of

__all__ = ["encode_shard", "encode_videos", "frames_per_unit", "mark_encode_replica", "reduce_encode_replica_grads", "EncodeStats", "encode_stats"]


@dataclasses.dataclass
class EncodeStats:
    """What this process's :func:`encode_videos` calls encoded (cache misses only), cumulative."""

    seconds: float = 0.0
    """Time of the tower + projector + all-gather (on CUDA: between events recorded around them, read
    when :func:`encode_stats` is called, so encoding itself never waits for the device)."""
    frames: int = 0
    """Frames of the videos encoded (each rank counts the whole videos, not its slice)."""
    calls: int = 0


_STATS = EncodeStats()
_PENDING: list = []  # (start, end) CUDA events not yet added to _STATS.seconds


def encode_stats() -> EncodeStats:
    """The process-wide :class:`EncodeStats` (read a field before and after a phase for its share)."""
    while _PENDING:
        start, end = _PENDING.pop()
        end.synchronize()
        _STATS.seconds += start.elapsed_time(end) / 1000.0
    return _STATS


def _agree_on_hits(hits: list[bool], group, device) -> list[bool]:
    """Every rank of ``group`` must take the same cache decisions, or the gather (or a TP-sharded
    tower's collectives) would hang.

    One small all-reduce and a device-to-host read per encode call (the decisions steer Python control
    flow, so they are needed on the host)."""
    if group is None or dist.get_world_size(group) == 1 or not hits:
        return hits
    flags = torch.tensor([1 if h else 0 for h in hits], dtype=torch.int32, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)
    return [bool(f) for f in flags.tolist()]


def encode_videos(
    encoder,
    videos: Sequence[torch.Tensor],
    groups: ParallelGroups,
    *,
    cache: Optional[VideoEmbeddingCache] = None,
    keys: Optional[Sequence[str]] = None,
) -> list[torch.Tensor]:
    """Encode ``videos`` (each ``[T_i, 3, H, W]``) over the encode group.

    Returns, per video, ``[T_i * tokens_per_frame (+1 newline), llm_hidden]`` on every rank of the
    group. With ``cache`` and ``keys``, cached videos are not encoded, and newly encoded ones are
    stored; cached entries carry no autograd graph, so a trainable encoder under grad mode bypasses
    the cache (its update pass must see the tower's gradient).
    """
    max_frames = encoder.vcfg.max_frames
    for i, video in enumerate(videos):
        encoder.check_frames(video, what=f"video {i}")
        if video.shape[0] > max_frames:
            raise ValueError(f"video {i} has {video.shape[0]} frames, more than max_frames={max_frames}")
        if video.shape[0] == 0:
            raise ValueError(f"video {i} has no frames")
    if keys is not None and len(keys) != len(videos):
        raise ValueError(f"keys: got {len(keys)} keys for {len(videos)} videos")
    trainable = torch.is_grad_enabled() and any(p.requires_grad for p in _per_frame_params(encoder))
    use_cache = cache is not None and keys is not None and not trainable
    device = device_of(encoder)
    tokens: list[Optional[torch.Tensor]] = [None] * len(videos)
    hits = [False] * len(videos)
    if use_cache:
        tokens = [cache.get(k, device=device) for k in keys]
        hits = _agree_on_hits([t is not None for t in tokens], groups.encode, device)
        if not groups.encode_includes_tp and groups.tp_size > 1:
            # a tower sharded over TP (Qwen2.5-VL, encode_group='cp') runs collectives over TP: its TP ranks
            # must encode the same videos too (MIN over the encode group, then over TP: the MIN over both)
            hits = _agree_on_hits(hits, groups.tp, device)
    todo = [i for i, hit in enumerate(hits) if not hit]
    if todo:
        on_cuda = device.type == "cuda"
        if on_cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            start = time.perf_counter()
        encoded = _encode_parallel(encoder, [videos[i] for i in todo], groups)
        if on_cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            _PENDING.append((start, end))
        else:
            _STATS.seconds += time.perf_counter() - start
        _STATS.frames += sum(videos[i].shape[0] for i in todo)
        _STATS.calls += 1
        for i, t in zip(todo, encoded):
            tokens[i] = t
            if use_cache:
                cache.put(keys[i], t)
    out = []
    for t in tokens:
        if encoder.image_newline is not None:
            t = torch.cat([t, encoder.image_newline[None].to(t.dtype)], dim=0)
        out.append(t)
    return out


def _per_frame_params(encoder):
    own = getattr(encoder, "per_frame_parameters", None)
    if own is not None:
        return list(own())
    return list(encoder.vit.parameters()) + list(encoder.projector.parameters())


def frames_per_unit(encoder) -> int:
    """Frames in one unit that parallel encoding splits (a Qwen2.5-VL temporal patch: 2; SigLIP: 1)."""
    if getattr(encoder, "video_units", None) is None:
        return 1
    return int(getattr(encoder.cfg, "temporal_patch_size", 1))


def encode_shard(groups: ParallelGroups, vision_config) -> FrameShard:
    """This rank's slice of each video in parallel encoding, for a data pipeline that decodes only it
    (``PromptStream`` / ``ResumableDataLoader`` ``shard=``); ``vision_config``: the tower's config."""
    unit = int(getattr(vision_config, "temporal_patch_size", 1))  # Qwen2.5-VL splits temporal patches
    return FrameShard(rank=groups.encode_rank, size=groups.encode_size, unit=unit)


def _local_units(encoder, video, start: int, stop: int) -> torch.Tensor:
    """This rank's frames ``[start, stop)`` of ``video`` (a tensor, or a ``LazyFrames`` that decodes just
    them), as the encoder's units."""
    piece = video.frames(start, stop) if is_lazy(video) else video[start:stop]  # [n, 3, H, W]
    to_units = getattr(encoder, "video_units", None)
    return piece if to_units is None else to_units(piece)


def _encode_parallel(encoder, videos: Sequence[torch.Tensor], groups: ParallelGroups) -> list[torch.Tensor]:
    """:func:`_encode_same_size` once per frame size, in order of first appearance: units of videos of
    different sizes (Qwen2.5-VL resizes each video on its own; an image beside videos) cannot share one
    tensor. The sizes are the videos' own shapes, the same on every rank, so the ranks make the same calls."""
    by_size: dict = {}
    for i, video in enumerate(videos):
        by_size.setdefault(tuple(video.shape[1:]), []).append(i)
    if len(by_size) == 1:
        return _encode_same_size(encoder, videos, groups)
    out: list = [None] * len(videos)
    for members in by_size.values():
        for i, tokens in zip(members, _encode_same_size(encoder, [videos[i] for i in members], groups)):
            out[i] = tokens
    return out


def _encode_same_size(encoder, videos: Sequence[torch.Tensor], groups: ParallelGroups) -> list[torch.Tensor]:
    """Each video's units split over the encode group on their own (:func:`frame_shard`), so the frames a
    rank encodes of a video do not depend on which other videos share the call: what a prefetcher
    decoded for this rank ahead of time (``LazyFrames.decode_shard``) is what the encoder asks for."""
    size, rank = groups.encode_size, groups.encode_rank
    unit = frames_per_unit(encoder)
    pieces, plan, errors = [], [], []
    for video in videos:
        per_rank, start, stop = frame_shard(video.shape[0], size, rank, unit)
        units = -(-video.shape[0] // unit)
        plan.append((per_rank, units))
        try:
            local = _local_units(encoder, video, start, stop) if stop > start else None
            errors.append(None)
        except VideoDecodeError as e:  # this rank's frames only: the group must hear of it before the gather
            local = None
            errors.append((e.path, str(e)))
        pieces.append(local)
    if any(is_lazy(v) for v in videos):  # only a LazyFrames decodes (and can fail) here
        agreed = agree_on_shard_errors(errors, groups.tp_cp)
        failed = next((e for e in agreed if e is not None), None)
        if failed is not None:
            raise shard_failure(failed)
    blank = next((p[:1] for p in pieces if p is not None and p.shape[0]), None)  # one unit, for its shape
    if blank is None:  # this rank holds only padding: a unit's shape without decoding anything
        v = videos[0]
        blank = _local_units(encoder, torch.zeros(min(unit, v.shape[0]), *v.shape[1:], device="cpu"), 0, unit)
    padded = []
    for local, (per_rank, _) in zip(pieces, plan):
        have = 0 if local is None else local.shape[0]
        if have:
            padded.append(local)
        if per_rank > have:  # blank units pad the last slices
            padded.append(blank.new_zeros(per_rank - have, *blank.shape[1:]))
    local_frames = torch.cat(padded) if len(padded) > 1 else padded[0]  # [L, 3, H, W] (or [L, units...])
    local_frames = local_frames.to(device_of(encoder), non_blocking=True)
    to_units = getattr(encoder, "video_units", None)
    local = encoder(local_frames) if to_units is None else encoder.encode_units(local_frames)  # [L, t, h]
    replicas = groups.tp_size if groups.encode_includes_tp else 1
    gathered = collectives.all_gather(local, 0, groups.encode, grad_scale=1.0 / replicas)  # [E * L, t, h]
    gathered = gathered.reshape(size, -1, *gathered.shape[1:])  # [E, L, t, h]: rank-major
    out, offset = [], 0
    real_tokens = getattr(encoder, "num_real_tokens", None)
    for video, (per_rank, units) in zip(videos, plan):
        tokens = gathered[:, offset : offset + per_rank].reshape(size * per_rank, *gathered.shape[2:])[:units]  # [units, t, h]
        tokens = tokens.reshape(units * tokens.shape[1], tokens.shape[2])  # [units * t, h]
        out.append(tokens if real_tokens is None else tokens[: real_tokens(video)])
        offset += per_rank
    return out


def mark_encode_replica(params) -> None:
    """Mark a tower's parameters as replicated on every rank and applied to each rank's own frames
    (:func:`reduce_encode_replica_grads` completes their gradients). Their megatron linears carry
    ``tensor_model_parallel`` although their TP group is this rank alone; cleared here, or megatron's
    gradient norm would count each such parameter once per TP rank (it skips only non-TP duplicates
    off TP rank 0)."""
    for p in params:
        p.encode_replica = True
        p.tensor_model_parallel = False


def reduce_encode_replica_grads(model, groups: ParallelGroups) -> None:
    """Sum the per-frame (tower + projector) gradients over the TP part of the encode group.

    Call after megatron's ``finalize_model_grads`` (which reduces over DP x CP). A no-op unless the
    encode group spans TP ranks. Reads DDP's ``main_grad`` when present.
    """
    if not groups.encode_includes_tp:
        return
    grads = []
    for param in model.parameters():
        if getattr(param, "encode_replica", False) and param.requires_grad:
            grad = getattr(param, "main_grad", None)
            grad = param.grad if grad is None else grad
            if grad is not None:
                grads.append(grad)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=groups.tp)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
