"""Qwen2.5-VL's vision tower (issue 14, second part) against transformers' own ``model.visual``.

Random tiny ``Qwen2_5_VLForConditionalGeneration``; its tower imported through ``vision_items``; the same
pixel patches for two videos (3 frames: an odd count, padded as transformers' processors pad; 112 x 168
px: a non-square 8 x 12 patch grid with 2 x 3 windows of 2 x 2 merge blocks) and a 56 x 56 image, with
a window layer and a full-attention layer: features equal within 1e-4 relative in fp32.
"""

from __future__ import annotations

import torch

from tests.dist import init_cpu_dist, run_ranks


def _worker(rank, world_size):
    from megatron_longvideo.models.qwen2_5_vl.hf import vision_config_from_hf, vision_items
    from megatron_longvideo.models.qwen2_5_vl.vision import build_qwen_vision_tower, frames_to_patches
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from tests.models.test_qwen2_5_vl_model import _hf

    init_cpu_dist()
    groups = initialize_parallel(ParallelConfig())
    hf = _hf()  # tower: a window layer, then a full-attention layer; 56 px windows
    config = hf.config
    cfg = vision_config_from_hf(config)
    tower = build_qwen_vision_tower(cfg, groups)
    tower.load_state_dict(dict(vision_items(hf.state_dict().items(), cfg)), strict=True)
    g = torch.Generator().manual_seed(2)
    videos = [torch.randn(3, 3, 112, 168, generator=g), torch.randn(1, 3, 56, 56, generator=g)]
    parts = [frames_to_patches(v, cfg) for v in videos]
    patches = torch.cat([p for p, _ in parts])
    grids = [grid for _, grid in parts]
    with torch.no_grad():
        ours = tower(patches, grids)
        theirs = hf.model.visual(patches, grid_thw=torch.tensor(grids))
    theirs = getattr(theirs, "pooler_output", theirs)
    destroy_parallel()
    return grids, ours, theirs


def test_vision_tower_equals_transformers():
    grids, ours, theirs = run_ranks(_worker, 1)[0]
    assert grids == [[2, 8, 12], [1, 4, 4]]
    assert ours.shape == theirs.shape == (2 * 8 * 12 // 4 + 4, 64), (ours.shape, theirs.shape)
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    assert rel < 1e-4, rel


def test_memory_model_counts_a_sharded_tower_per_rank():
    """With encode_group='cp' and TP > 1 the memory model takes one rank's share of the tower (its exact
    per-rank count is checked against a built TP = 2 tower in test_qwen2_5_vl_invariance); 'tp_cp' keeps
    it whole and splits the frames over TP instead. The SigLIP tower is never sharded."""
    import pytest

    from megatron_longvideo.memory_model import StepLayout, predict_step_memory, vision_param_count
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.models.qwen2_5_vl.vision import QwenVisionConfig
    from megatron_longvideo.models.llava_onevision.vision import VisionConfig

    vision = QwenVisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                              fullatt_block_indexes=(7, 15, 23, 31))
    llm = LLMConfig(hidden_size=3584, num_layers=2, num_attention_heads=28, num_query_groups=4, ffn_hidden_size=18944,
                    mrope_section=(16, 24, 24))
    full, half = vision_param_count(vision, 3584), vision_param_count(vision, 3584, tensor_parallel=2)
    assert full / 2 < half < full / 2 + vision.patch_dim * vision.hidden_size + 4 * vision.hidden_size * vision.depth
    with pytest.raises(ValueError, match="tensor_parallel=8"):
        vision_param_count(vision, 3584, tensor_parallel=8)  # 3420 / 8
    with pytest.raises(ValueError, match="SigLIP"):
        vision_param_count(VisionConfig(), 64, tensor_parallel=2)
    base = dict(mode="stage12", ranks=2, group_size=4, response_len=64, tensor_parallel=2, reference="none")
    cp, tp_cp = (predict_step_memory(llm, vision, 64, StepLayout(**base, encode_group=g), image_size=448)
                 for g in ("cp", "tp_cp"))
    assert cp.static < tp_cp.static and cp.parts["rollout"]["encode"] != tp_cp.parts["rollout"]["encode"]
    with pytest.raises(ValueError, match="encode_group"):
        StepLayout(**base, encode_group="tp")
