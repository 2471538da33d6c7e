"""Several visual inputs in one prompt against transformers' own models (issue 18): a model imported from a
random tiny Hugging Face checkpoint gives transformers' logits within 1e-4 relative (fp32) on a prompt
holding an image (a one-frame video) and two videos, each its own placeholder run between text.

* Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): one image and two videos of different lengths and
  sizes in one prompt, each with its own grid and time step.
* LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): two videos in one prompt (transformers
  takes one ``[videos, T, 3, H, W]`` tensor, so equal frame counts), and an image as a one-frame video.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from tests.dist import init_cpu_dist, run_ranks
from tests.models.test_qwen2_5_vl_model import VIDEO, _hf


def _qwen_check():
    from megatron_longvideo.models.qwen2_5_vl.model import build_qwen25vl, load_hf_state, qwen25vl_config_from_hf, qwen_vlm_forward
    from megatron_longvideo.models.qwen2_5_vl.vision import frames_to_patches
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    groups = initialize_parallel(ParallelConfig())
    hf = _hf()
    cfg = dataclasses.replace(qwen25vl_config_from_hf(hf.config), text_after="spatial")
    model = build_qwen25vl(cfg, groups)
    load_hf_state(model, groups, hf.state_dict().items())
    g = torch.Generator().manual_seed(4)
    visuals = [torch.randn(1, 3, 56, 56, generator=g),  # an image: one frame (the tower repeats it)
               torch.randn(3, 3, 112, 168, generator=g), torch.randn(4, 3, 56, 112, generator=g)]
    spacing = [0.5, 1.0, 0.25]
    pieces = [torch.tensor([9])]
    for v in visuals:
        n = cfg.num_video_tokens(v.shape[0], v.shape[2], v.shape[3])
        pieces += [torch.tensor([7]), torch.full((n,), VIDEO), torch.tensor([8]), torch.randint(10, 96, (3,), generator=g)]
    ids = torch.cat(pieces)
    ids = torch.cat([ids, torch.randint(10, 96, ((-len(ids)) % 4,), generator=g)])[None]  # [1, S]
    patches, grids = zip(*(frames_to_patches(v, cfg.vision) for v in visuals))
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values_videos=torch.cat(patches), video_grid_thw=torch.tensor(grids),
                      second_per_grid_ts=torch.tensor([s * cfg.vision.temporal_patch_size for s in spacing]),
                      mm_token_type_ids=(ids == VIDEO).int() * 2).logits
        ours = qwen_vlm_forward(model, groups, input_ids=ids, videos=[visuals], seconds_per_frame=[spacing])
    destroy_parallel()
    return {"qwen": ((ours - expected).norm() / expected.norm()).item(), "qwen_grids": [list(x) for x in grids]}


def _llava_check(folder):
    from transformers import LlavaOnevisionForConditionalGeneration

    from megatron_longvideo.checkpoint.hf_convert import load_hf_into_model
    from megatron_longvideo.models.llava_onevision.model import build_vlm
    from megatron_longvideo.models.vlm import vlm_forward
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from tests.checkpoint.test_hf_export import VIDEO_ID, VOCAB, _cfgs

    cfg = _cfgs()["vlm"]
    groups = initialize_parallel(ParallelConfig())
    torch.manual_seed(1)
    model = build_vlm(cfg, groups)
    load_hf_into_model(model, groups, folder, cfg)
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(6)
    out = {}
    for name, frames in (("llava_two_videos", [3, 3]), ("llava_image", [1])):
        visuals = [torch.randn(t, 3, 40, 40, generator=g) for t in frames]
        pieces = [torch.randint(4, VOCAB, (2,), generator=g)]
        for v in visuals:
            pieces += [torch.full((cfg.vision.num_video_tokens(v.shape[0]),), VIDEO_ID), torch.randint(4, VOCAB, (5,), generator=g)]
        ids = torch.cat(pieces)[None]  # [1, S]
        with torch.no_grad():
            expected = hf(input_ids=ids, pixel_values_videos=torch.stack(visuals)).logits
            ours = vlm_forward(model, groups, input_ids=ids, videos=[visuals])
        out[name] = ((ours - expected).norm() / expected.norm()).item()
    destroy_parallel()
    return out


def _worker(rank, world_size, folder):
    init_cpu_dist()
    return {**_qwen_check(), **_llava_check(folder)}


def test_image_and_two_videos_in_one_prompt_equal_transformers(tmp_path):
    from transformers import LlavaOnevisionForConditionalGeneration

    from megatron_longvideo.checkpoint.hf_config import hf_config
    from tests.checkpoint.test_hf_export import _cfgs

    torch.manual_seed(7)
    hf = LlavaOnevisionForConditionalGeneration(hf_config(_cfgs()["vlm"]))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "post_layernorm" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    folder = os.path.join(str(tmp_path), "llava")
    hf.save_pretrained(folder)
    errors = run_ranks(_worker, 1, folder)[0]
    assert errors.pop("qwen_grids") == [[1, 4, 4], [2, 8, 12], [2, 4, 8]]
    assert all(e < 1e-4 for e in errors.values()), errors
