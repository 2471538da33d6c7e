"""Attention memory is linear in the sequence: no ``[sq, sk]`` tensor, and 4x the tokens cost about 4x.

Measured exactly by :class:`~megatron_longvideo.memory_meter.LiveTensorMeter` (bytes of live tensors
counted at the dispatcher, deterministic), never by timing.
"""

from __future__ import annotations

import torch

from megatron_longvideo.attention.backends import BACKENDS
from megatron_longvideo.attention.dense import chunk_index, dense_attention, visible_mask
from megatron_longvideo.attention.engine import tile_attention
from megatron_longvideo.attention.layout import SequenceLayout, rank_chunks
from megatron_longvideo.attention.tiles import plan_tiles
from megatron_longvideo.memory_meter import LiveTensorMeter
from tests.dist import init_cpu_dist, run_ranks


def _packed_layout(seq_len: int, responses: int = 4) -> SequenceLayout:
    prefix = seq_len * 3 // 4
    n = (seq_len - prefix) // responses
    seg = torch.full((1, seq_len), -1, dtype=torch.long)
    seg[0, :prefix] = 0
    for g in range(responses):
        seg[0, prefix + g * n : prefix + (g + 1) * n] = g + 1
    return SequenceLayout.from_segments(seg)


def test_no_score_tensor_in_forward_or_backward():
    s, h, d = 2048, 4, 32
    layout = _packed_layout(s)
    q, k, v = (torch.randn(s, 1, h, d).permute(1, 2, 0, 3).requires_grad_(True) for _ in range(3))
    plan = plan_tiles(layout, 1, rank_chunks(s, 1, 0), rank_chunks(s, 1, 0))
    with LiveTensorMeter() as tiles:
        out = tile_attention(q, k, v, plan, scale=0.2, backend=BACKENDS["cpu_flash"])
        out.sum().backward()
    with LiveTensorMeter() as dense:  # the oracle, to show the meter sees a score matrix when there is one
        idx = chunk_index(rank_chunks(s, 1, 0))
        out, _ = dense_attention(q, k, v, visible_mask(layout, 1, idx, idx), 0.2)
        out.sum().backward()
    per_head_tensor = s * h * d  # q, k, v, out, their gradients
    assert tiles.largest <= per_head_tensor, (tiles.largest, per_head_tensor)
    assert dense.largest >= h * s * s
    assert tiles.peak < dense.peak / 20, (tiles.peak, dense.peak)


def _llm_worker(rank, world_size, lengths):
    init_cpu_dist()
    from megatron_longvideo.models.llm import LLMConfig, build_llm, lm_forward
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    groups = initialize_parallel(ParallelConfig(), seed=0)
    model = build_llm(LLMConfig.tiny(vocab_size=256), groups)
    peaks, largest = {}, {}
    for s in lengths:
        layout = _packed_layout(s)
        seg = layout.segment_ids(0)[None]
        ids = torch.randint(0, 256, (1, s), generator=torch.Generator().manual_seed(s))
        with LiveTensorMeter() as meter:
            loss = lm_forward(model, input_ids=ids, position_ids=torch.arange(s)[None], labels=ids,
                              segment_ids=seg, layout=layout)
            loss.float().sum().backward()
        model.zero_grad(set_to_none=True)
        peaks[s], largest[s] = meter.peak, meter.largest
    # the vision tower runs the same engine: 32 x 32 = 1,024 patches per frame, no [patches, patches] scores
    from megatron_longvideo.attention.core import TileCoreAttention
    from megatron_longvideo.models.llava_onevision.vision import VisionConfig, build_vision_encoder

    vcfg = VisionConfig(image_size=128, patch_size=4, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64)
    tower = build_vision_encoder(vcfg, 64, groups)
    kinds = {type(layer.self_attention.core_attention) for layer in tower.vit.decoder.layers}
    with LiveTensorMeter() as meter:
        tower(torch.randn(4, 3, 128, 128)).sum().backward()
    destroy_parallel()
    return peaks, largest, (kinds == {TileCoreAttention}, meter.largest)


def test_tiny_llm_working_memory_grows_linearly_and_the_tower_builds_no_scores():
    peaks, largest, (engine_in_tower, tower_largest) = run_ranks(_llm_worker, 1, (4096, 16384))[0]
    assert engine_in_tower
    patches, heads, frames = 1024, 2, 4
    assert tower_largest < frames * heads * patches * patches / 8, tower_largest
    ratio = peaks[16384] / peaks[4096]
    # everything left is per token (activations, logits over the vocabulary): 4x tokens, about 4x bytes
    assert ratio < 4.4, (peaks, ratio)
    assert largest[16384] < 16384 * 1024, largest  # nothing near [s, s] = 2.7e8 elements
