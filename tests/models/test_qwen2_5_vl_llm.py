"""Qwen2.5-VL's language model side (issue 14, first part), checked against transformers' own classes.

* ``mrope_position_ids`` equals ``Qwen2_5_VLModel.get_rope_index`` (transformers' text-after-vision rule,
  ``text_after="spatial"``) on random text / video / image layouts with fractional seconds per grid,
  and the reference rule (``"max"``) equals it wherever the temporal row stays below the spatial extent.
* A random tiny ``Qwen2_5_VLForConditionalGeneration``'s language model, imported through the Qwen2
  weight map, gives transformers' logits within 1e-4 relative on a text prompt and on a video-shaped
  prompt (random embeddings at the video tokens, three-row positions of a 3 x 4 x 6 grid).
* At CP=2 (all_gather and p2p) the multimodal positions shard with the tokens: logits equal world=1.
"""

from __future__ import annotations

import random

import torch

from tests.dist import init_cpu_dist, run_ranks

VIDEO, IMAGE = 5, 6
SECTION = [2, 3, 3]  # head_dim 16


def _hf_config():
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": SECTION}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[0], window_size=56, tokens_per_second=2),
        video_token_id=VIDEO, image_token_id=IMAGE, vision_start_token_id=7, vision_end_token_id=8)


def _layout(rng):
    """Random ids with vision blocks, their grids and seconds per grid."""
    ids, videos, images, seconds = [], [], [], []
    for _ in range(rng.randint(1, 3)):
        ids += [rng.randrange(10, 96) for _ in range(rng.randint(1, 5))]
        t, h, w = rng.choice([1, 2, 3, 4, 7]), 2 * rng.randint(1, 3), 2 * rng.randint(1, 3)
        if rng.random() < 0.3:
            images.append([1, h, w])
            ids += [IMAGE] * (h * w // 4)
        else:
            videos.append([t, h, w])
            seconds.append(rng.choice([0.5, 1.0, 1.5, 2.0]))
            ids += [VIDEO] * (t * h * w // 4)
    ids += [rng.randrange(10, 96) for _ in range(rng.randint(0, 4))]
    return ids, videos, images, seconds


def test_positions_equal_transformers_get_rope_index():
    from transformers import Qwen2_5_VLModel

    from megatron_longvideo.models.qwen2_5_vl.rope import mrope_position_ids

    with torch.device("meta"):
        hf = Qwen2_5_VLModel(_hf_config())
    rng, differ = random.Random(0), 0
    for _ in range(40):
        ids, videos, images, seconds = _layout(rng)
        x = torch.tensor([ids])
        types = torch.where(x == VIDEO, 2, torch.where(x == IMAGE, 1, 0))
        kwargs = dict(video_grid_thw=torch.tensor(videos) if videos else None,
                      image_grid_thw=torch.tensor(images) if images else None)
        expected, expected_delta = hf.get_rope_index(x, types, second_per_grid_ts=torch.tensor(seconds) if seconds else None,
                                                     **kwargs)
        ours = dict(video_token_id=VIDEO, image_token_id=IMAGE, second_per_grid_ts=seconds, tokens_per_second=2, **kwargs)
        spatial, delta = mrope_position_ids(x, text_after="spatial", **ours)
        assert torch.equal(spatial, expected) and torch.equal(delta, expected_delta), (ids, videos, images, seconds)
        reference, _ = mrope_position_ids(x, **ours)
        if torch.equal(reference, expected):
            continue
        differ += 1  # only where a block's temporal row reached past its spatial extent
        assert any(int(t * 2 * s) >= max(h, w) // 2 for (t, h, w), s in zip(videos, seconds) if t > 1) or any(
            (t - 1) * 2 * s >= max(h, w) // 2 for (t, h, w), s in zip(videos, seconds))
    assert 0 < differ < 40


def _build(groups, cp_type=None):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_longvideo.checkpoint.full_state import load_full_state
    from megatron_longvideo.checkpoint.hf_map import WeightMap
    from megatron_longvideo.models.llm import build_llm
    from megatron_longvideo.models.qwen2_5_vl.hf import language_model_items, llm_config_from_hf

    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(_hf_config()).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    cfg = llm_config_from_hf(hf.config)
    model = build_llm(cfg, groups)
    load_full_state(model, dict(WeightMap(cfg).to_megatron(language_model_items(hf.state_dict().items()))), groups)
    return hf, model


def _inputs():
    from megatron_longvideo.models.qwen2_5_vl.rope import mrope_position_ids

    g = torch.Generator().manual_seed(1)
    n = 3 * 4 * 6 // 4
    ids = torch.cat([torch.randint(10, 96, (5,), generator=g), torch.full((n,), VIDEO), torch.randint(10, 96, (7,), generator=g)])[None]
    positions, _ = mrope_position_ids(ids, video_token_id=VIDEO, video_grid_thw=torch.tensor([[3, 4, 6]]),
                                      second_per_grid_ts=[1.5], tokens_per_second=2)
    features = torch.randn(n, 64, generator=g)
    return ids, positions, features


def _ours(model, groups, ids, positions, embeds=None):
    """This CP rank's logits ``[1, s_local, vocab]``: ids, the three position rows and embeddings sharded alike."""
    from megatron_longvideo.models.llm import lm_forward
    from megatron_longvideo.training.lm_step import cp_shard

    decoder_input = None if embeds is None else cp_shard(embeds, groups).transpose(0, 1).contiguous()
    with torch.no_grad():
        return lm_forward(model, input_ids=cp_shard(ids, groups), position_ids=cp_shard(positions, groups, dim=-1),
                          decoder_input=decoder_input)


def _world1_worker(rank, world_size):
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    init_cpu_dist()
    groups = initialize_parallel(ParallelConfig())
    hf, model = _build(groups)
    ids, positions, features = _inputs()
    out = {}
    with torch.no_grad():
        text = ids.clone()
        text[text == VIDEO] = 11
        expected = hf(input_ids=text).logits
        from megatron_longvideo.models.qwen2_5_vl.rope import mrope_position_ids

        text_positions, _ = mrope_position_ids(text, video_token_id=VIDEO)
        out["text"] = (_ours(model, groups, text, text_positions), expected)
        embeds = hf.get_input_embeddings()(ids)
        embeds[0, ids[0] == VIDEO] = features
        expected = hf(inputs_embeds=embeds, position_ids=positions).logits
        out["video"] = (_ours(model, groups, ids, positions, embeds), expected)
    destroy_parallel()
    return out


def test_language_model_logits_equal_transformers():
    out = run_ranks(_world1_worker, 1)[0]
    for kind in ("text", "video"):
        ours, expected = out[kind][0], out[kind][1]
        rel = ((ours - expected).norm() / expected.norm()).item()
        assert rel < 1e-4, (kind, rel)


def _cp_worker(rank, world_size, cp_type):
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.training.lm_step import cp_shard

    init_cpu_dist()
    groups = initialize_parallel(ParallelConfig(context_parallel_size=2, cp_comm_type=cp_type))
    hf, model = _build(groups)
    ids, positions, features = _inputs()
    ids, positions = ids[:, :28], positions[:, :, :28]  # a multiple of 2 x CP, cut inside the text after the video
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(ids)
        embeds[0, ids[0] == VIDEO] = features
        expected = cp_shard(hf(inputs_embeds=embeds, position_ids=positions).logits, groups)
    ours = _ours(model, groups, ids, positions, embeds)
    destroy_parallel()
    return ((ours - expected).norm() / expected.norm()).item()


def test_multimodal_positions_shard_with_cp():
    for cp_type in ("all_gather", "p2p"):
        errors = run_ranks(_cp_worker, 2, cp_type)
        assert max(errors) < 1e-4, (cp_type, errors)
