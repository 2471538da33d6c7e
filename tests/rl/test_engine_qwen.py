"""The CPU rollout engine for Qwen2.5-VL (transformers' own text model at the policy's multimodal positions).

The tiny random ``Qwen2_5_VLForConditionalGeneration`` of ``tests/models/test_qwen2_5_vl_model.py`` imported
into our model; our merged prompt embeddings (cached-style video tokens from our tower) and positions go
to the engine. Its first-token logits equal transformers' model fed the pixels (1e-4 relative), and its
greedy continuation equals transformers' ``generate`` (which decodes with its rope deltas). Sampling with a
seed is reproducible, and top-p 0 < p < 1 only ever picks tokens inside the nucleus.
"""

from __future__ import annotations

import dataclasses

import torch

from tests.dist import init_cpu_dist, run_ranks
from tests.models.test_qwen2_5_vl_model import VIDEO, _hf


def _worker(rank, world_size):
    from megatron_longvideo.checkpoint.full_state import gather_full_state
    from megatron_longvideo.models.qwen2_5_vl.model import build_qwen25vl, load_hf_state, qwen25vl_config_from_hf
    from megatron_longvideo.models.qwen2_5_vl.vision import frames_to_patches
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.rl.engines import build_engine
    from megatron_longvideo.rl.engines.base import SamplingConfig
    from megatron_longvideo.rl.rollout import RLPrompt, prompt_embeddings

    init_cpu_dist()
    groups = initialize_parallel(ParallelConfig())
    hf = _hf()
    cfg = dataclasses.replace(qwen25vl_config_from_hf(hf.config), text_after="spatial")  # transformers 5's rule
    model = build_qwen25vl(cfg, groups)
    load_hf_state(model, groups, hf.state_dict().items())
    g = torch.Generator().manual_seed(4)
    frames = torch.randn(3, 3, 112, 168, generator=g)
    n = cfg.num_video_tokens(3, 112, 168)
    ids = torch.cat([torch.tensor([9, 7]), torch.full((n,), VIDEO), torch.tensor([8]), torch.randint(10, 96, (6,), generator=g)])
    prompt = RLPrompt(videos=(frames,), prompt_ids=ids, ground_truth=None, content_ids=("clip",))
    with torch.no_grad():
        embeds = prompt_embeddings(model, groups, [prompt])
    positions = model.rollout_positions([prompt])
    engine = build_engine("hf", cfg)
    engine.sync_weights(gather_full_state(model, groups))
    ours = engine.prompt_logits(embeds[0], positions[0])
    patches, grid = frames_to_patches(frames, cfg.vision)
    inputs = dict(input_ids=ids[None], pixel_values_videos=patches, video_grid_thw=torch.tensor([grid]),
                  second_per_grid_ts=torch.tensor([1.0]), mm_token_type_ids=(ids[None] == VIDEO).int() * 2)
    with torch.no_grad():
        theirs = hf(**inputs).logits[0, -1]
        their_tokens = hf.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None)[0, len(ids):].tolist()
    greedy = engine.generate(embeds, SamplingConfig(max_new_tokens=6, temperature=0.0), positions=positions)[0][0]
    sampled = [engine.generate(embeds, SamplingConfig(max_new_tokens=5, n=3, seed=7, logprobs=True), positions=positions)
               for _ in range(2)]
    nucleus = engine.generate(embeds, SamplingConfig(max_new_tokens=1, n=16, seed=1, top_p=0.3), positions=positions)[0]
    probs = torch.softmax(ours, -1)
    order = probs.argsort(descending=True)
    inside = set(order[: int((probs[order].cumsum(0) - probs[order] <= 0.3).sum())].tolist())
    destroy_parallel()
    return {"rel": ((ours - theirs).norm() / theirs.norm()).item(), "ours_tokens": list(greedy.token_ids),
            "their_tokens": their_tokens, "same_samples": sampled[0] == sampled[1],
            "logprobs": [c.logprobs for c in sampled[0][0]],
            "nucleus_ok": all(c.token_ids[0] in inside for c in nucleus)}


def test_engine_matches_transformers_on_a_video_prompt():
    out = run_ranks(_worker, 1)[0]
    assert out["rel"] < 1e-4, out["rel"]
    assert out["ours_tokens"] == out["their_tokens"], out
    assert out["same_samples"] and all(lp is not None and len(lp) > 0 for lp in out["logprobs"])
    assert out["nucleus_ok"]
