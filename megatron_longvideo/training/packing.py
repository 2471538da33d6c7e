"""Sequence packing for the next-token loss (projector pretraining, CoT-SFT): a micro-batch in fewer rows.

:func:`pack_vlm_batch` lays the samples of a collated micro-batch end to end: one row (the samples'
total length, rounded up to the CP multiple), or, with ``seq_length``, first-fit into rows of that
length. Each sample is a segment of its own under a causal layout with no shared segment, and the
padding at the end of a row is one more, so no token sees another sample or the padding; RoPE positions
restart at 0 for every sample (Qwen2.5-VL's three multimodal rows: the sample's own, as if it were
alone). Targets are shifted inside each sample, so the last token of a sample predicts nothing, as in
a padded row. The packed loss sum, token count, per-token losses and gradients are therefore those of
:func:`~megatron_longvideo.training.vlm_step.prepare_vlm_batch`'s padded rows (fp32 tolerance), with
the padding gone.

:func:`packed_vlm_forward` runs a packed micro-batch through a model of either family: the videos are
encoded over the encode group in the collated order (through the embedding cache), each row's videos
merged in text order, and the sequence, positions and labels sharded over CP. The layout reaches the
core attention as a host-side :class:`~megatron_longvideo.attention.layout.SequenceLayout` through
:func:`~megatron_longvideo.models.llm.lm_forward` (the mechanism of the GRPO prefill), so the attention
runs tiles on the segments' diagonal blocks and no ``[S, S]`` mask exists.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_longvideo.data.prompts import IGNORE_INDEX
from megatron_longvideo.parallel.groups import ParallelGroups

__all__ = ["PAD_SEGMENT", "first_fit", "sample_lengths", "pack_vlm_batch", "packed_positions", "packed_vlm_forward"]

PAD_SEGMENT = -1
"""Segment of a row's trailing padding (samples are segments 0..b-1: their index in the micro-batch)."""


def sample_lengths(batch: dict) -> list[int]:
    """Real length of each sample of a collated batch: its ``attention_mask`` (every column without one)."""
    mask = batch.get("attention_mask")
    b, s = batch["input_ids"].shape
    if mask is None:
        return [s] * b
    return [int(n) for n in mask.sum(dim=1).tolist()]


def first_fit(lengths: Sequence[int], capacity: Optional[int]) -> list[list[int]]:
    """Sample indices per row: each sample, in order, goes into the first row with room for it
    (``capacity`` ``None``: one row for all). A row keeps its samples in batch order."""
    if capacity is None:
        return [list(range(len(lengths)))]
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than the packed row length --seq-length={capacity}")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def pack_vlm_batch(batch: dict, *, pad_id: int, multiple: int = 1, seq_length: Optional[int] = None) -> dict:
    """Collated batch -> packed rows: ``input_ids``, ``labels`` (next token), ``loss_mask``, ``segment_ids``
    ``[rows, S]`` (host), ``layout``, ``videos`` (per *sample*, as collated), ``rows`` (sample indices of
    each row) and ``spans`` (per row, ``(sample, start, length)``).

    ``S`` is ``seq_length`` when given (first-fit rows of that length), else the samples' total length
    rounded up to ``multiple`` (one row).
    """
    from megatron_longvideo.attention.layout import SequenceLayout

    input_ids, labels = batch["input_ids"], batch["labels"]  # [b, s]
    if labels is None:
        raise ValueError("batch has no labels: the dataset mode must be 'pretrain' or 'sft' for a loss step")
    if seq_length is not None and seq_length % multiple:
        raise ValueError(f"seq_length={seq_length} must be a multiple of {multiple} (2 x CP, x TP under SP)")
    videos = [list(v) for v in batch["videos"]]
    if len(videos) != input_ids.shape[0]:
        raise ValueError(f"videos: got video lists for {len(videos)} samples, the batch has {input_ids.shape[0]}")
    input_ids, labels = input_ids.cpu(), labels.cpu()  # index data: packed on the host
    lengths = sample_lengths(batch)
    rows = first_fit(lengths, seq_length)
    length = seq_length if seq_length is not None else -(-sum(lengths) // multiple) * multiple
    num_rows = len(rows)
    ids = torch.full((num_rows, length), pad_id, dtype=torch.long, device="cpu")  # [rows, S]
    target = torch.full((num_rows, length), IGNORE_INDEX, dtype=torch.long, device="cpu")  # [rows, S]
    segments = torch.full((num_rows, length), PAD_SEGMENT, dtype=torch.long, device="cpu")  # [rows, S]
    spans = []
    for r, row in enumerate(rows):
        start, row_spans = 0, []
        for i in row:
            n = lengths[i]
            ids[r, start : start + n] = input_ids[i, :n]
            target[r, start : start + n - 1] = labels[i, 1:n]  # the sample's last token predicts nothing
            segments[r, start : start + n] = i
            row_spans.append((i, start, n))
            start += n
        spans.append(row_spans)
    mask = target != IGNORE_INDEX
    layout = SequenceLayout.from_segments(segments, seq_len=length, causal=True, shared_segment=None,
                                          pad_segment=PAD_SEGMENT)
    return {"input_ids": ids, "labels": target.masked_fill(~mask, 0), "loss_mask": mask.float(),
            "segment_ids": segments, "layout": layout, "videos": videos, "rows": rows, "spans": spans}


def packed_positions(batch: dict, cfg) -> torch.Tensor:
    """RoPE positions of a packed batch (host): ``[rows, S]``, 0.. per sample; for a family with multimodal
    RoPE (a config with ``positions(ids, videos)``: Qwen2.5-VL) ``[3, rows, S]``, each sample's own."""
    ids = batch["input_ids"]
    rows, length = ids.shape
    multimodal = getattr(cfg, "positions", None)
    out = torch.zeros((3, rows, length) if multimodal else (rows, length), dtype=torch.long, device="cpu")
    for r, row_spans in enumerate(batch["spans"]):
        for i, start, n in row_spans:
            if multimodal:
                pos, _ = multimodal(ids[r : r + 1, start : start + n], batch["videos"][i])  # [3, 1, n]
                out[:, r, start : start + n] = pos[:, 0]
            else:
                out[r, start : start + n] = torch.arange(n, device="cpu")
    return out


def packed_vlm_forward(model, groups: ParallelGroups, batch: dict, *, cache=None,
                       cache_keys: Optional[Sequence[Sequence[str]]] = None):
    """A :func:`pack_vlm_batch` micro-batch through the (possibly DDP-wrapped) model of either family.

    ``cache_keys[i]``: sample i's video keys (collated order, as for
    :func:`~megatron_longvideo.models.vlm.vlm_forward`). Returns the per-token loss ``[rows, s_local]``
    (this CP rank's tokens), or the hidden states on a pipeline stage before the last.
    """
    from megatron.core import tensor_parallel

    from megatron_longvideo.models.encode import encode_videos
    from megatron_longvideo.models.llm import lm_forward, unwrap
    from megatron_longvideo.models.merge import merge_video_tokens
    from megatron_longvideo.models.vlm import text_embeddings
    from megatron_longvideo.platform.device import device_of
    from megatron_longvideo.training.lm_step import cp_shard

    inner = unwrap(model)
    cfg = inner.cfg
    if getattr(cfg, "video_token_id", None) is None:
        raise ValueError(f"--pack-sequences: packing covers the video-language families; {type(cfg).__name__} has "
                         f"no video placeholder (video_token_id)")
    kind = getattr(getattr(inner, "llm", inner), "core_attention_kind", "engine")
    if kind != "engine":  # lm_forward refuses too; this names the SFT flag
        raise ValueError(f"--pack-sequences needs --core-attention engine: {kind!r} attends plain causal rows only, "
                         f"so packed samples would see each other")
    device = device_of(inner)
    videos = batch["videos"]
    decoder_input = None
    if inner.pre_process:
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        flat = [v for sample in videos for v in sample]  # the collated order: encoded as unpacked
        keys = None if cache_keys is None else [k for sample in cache_keys for k in sample]
        encoded = iter(encode_videos(inner.vision, flat, groups, cache=cache, keys=keys) if flat else [])
        per_sample = [[next(encoded) for _ in sample] for sample in videos]
        per_row = [[e for i in row for e in per_sample[i]] for row in batch["rows"]]  # text order in the row
        merged = merge_video_tokens(text_embeddings(model, input_ids), input_ids, per_row, cfg.video_token_id)
        decoder_input = cp_shard(merged.embeds, groups, dim=1).transpose(0, 1).contiguous()  # [s_local, rows, h]
        if groups.config.sequence_parallel:
            decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input, group=groups.tp)
    positions = cp_shard(packed_positions(batch, cfg).to(device), groups, dim=-1)  # [(3,) rows, s_local]
    labels = cp_shard(batch["labels"].to(device, non_blocking=True), groups)  # [rows, s_local]
    return lm_forward(model, decoder_input=decoder_input, position_ids=positions, labels=labels, layout=batch["layout"])
