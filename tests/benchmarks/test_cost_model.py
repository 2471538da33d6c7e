"""The cost model (``benchmarks/cost_model.py``): FLOP counts against parameter counts and transformers'
configs, and the CPU models it matches to the 7B references (ratios computed, never written in)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks"))

import cost_model as cm  # noqa: E402


@pytest.mark.parametrize("make", [cm.llava_onevision_7b, cm.qwen2_5_vl_7b])
def test_7b_llm_flops_per_token_is_twice_its_weights(make):
    """The layers' FLOPs per token are 2 x their weights (within 1%: biases and norms are not matmuls); with the
    output layer, 2 x the parameters less the input embedding (a lookup); and within 10% of the 2 x parameters
    rule of thumb."""
    from megatron_longvideo.memory_model import llm_param_count

    llm = make().llm
    params = llm_param_count(llm)
    embed = llm.vocab_size * llm.hidden_size
    layers = params - 2 * embed - llm.hidden_size  # untied: input embedding, output layer, final norm
    assert abs(cm.llm_flops_per_token(llm) / (2 * layers) - 1) < 0.01
    with_head = cm.llm_flops_per_token(llm, head=True)
    assert abs(with_head / (2 * (params - embed)) - 1) < 0.01
    assert abs(with_head / (2 * params) - 1) < 0.10
    # attention: 4 L h per key
    assert cm.llm_flops_per_token(llm, context=1000) - cm.llm_flops_per_token(llm) == 4 * llm.num_layers * 1000 * llm.hidden_size


def test_towers_against_their_parameter_counts():
    """Without attention and on one patch the tower FLOPs are 2 x its matmul weights per patch: SigLIP-so400m's
    (about 400M parameters) and the Qwen2.5-VL-7B ViT's (about 670M; its merger runs on a quarter of the patches),
    counted by the memory model."""
    import dataclasses

    from megatron_longvideo.memory_model import vision_param_count

    siglip = cm.llava_onevision_7b()
    v = siglip.vision
    per_patch = cm.vision_flops_per_frame(v, siglip.llm.hidden_size) / v.grid ** 2
    attention = 4 * v.grid ** 2 * v.hidden_size * v.num_layers
    params = vision_param_count(v, siglip.llm.hidden_size)
    assert 0.35e9 < params - (v.hidden_size * siglip.llm.hidden_size + siglip.llm.hidden_size ** 2) < 0.45e9
    assert abs((per_patch - attention) / (2 * params) - 1) < 0.03  # position embeddings, biases, norms: no FLOPs

    qwen = cm.qwen2_5_vl_7b(448)
    q = dataclasses.replace(qwen.vision, window_size=qwen.vision.spatial_merge_size * qwen.vision.patch_size,
                            fullatt_block_indexes=())
    n = (448 // q.patch_size) ** 2
    per_patch = cm.vision_flops_per_frame(q, qwen.llm.hidden_size, image_size=448) * q.temporal_patch_size / n
    attention = 4 * 4 * q.hidden_size * q.depth  # windows of 2 x 2 patches
    u, c = q.merge_unit, q.hidden_size
    merger = (u * c) ** 2 + u * c * q.out_hidden_size  # runs on a quarter of the patches (2 x 2 merge blocks)
    weights = vision_param_count(q, qwen.llm.hidden_size) - merger * (1 - 1 / u)
    assert 0.6e9 < vision_param_count(q, qwen.llm.hidden_size) < 0.7e9
    assert abs((per_patch - attention) / (2 * weights) - 1) < 0.01


def test_references_against_transformers_and_the_library():
    """Qwen2.5-VL-7B's tower as transformers' ``Qwen2_5_VLVisionConfig`` defaults (all but the width, see
    :func:`cost_model.qwen2_5_vl_7b_vision`); LLaVA-OneVision-7B is ``VLMConfig.seven_b()``: 196 tokens per
    frame; Qwen at 448 px: 128."""
    from transformers import Qwen2_5_VLConfig

    from megatron_longvideo.models.llava_onevision.model import VLMConfig

    hf = Qwen2_5_VLConfig().vision_config
    ours = cm.qwen2_5_vl_7b_vision()
    for name in ("depth", "intermediate_size", "num_heads", "patch_size", "spatial_merge_size", "temporal_patch_size",
                 "window_size", "out_hidden_size"):
        assert getattr(ours, name) == getattr(hf, name), name
    assert tuple(hf.fullatt_block_indexes) == ours.fullatt_block_indexes
    assert Qwen2_5_VLConfig().text_config.vocab_size == cm.qwen2_5_vl_7b_llm().vocab_size
    llava = cm.llava_onevision_7b()
    assert llava.llm == VLMConfig.seven_b().llm and llava.tokens_per_frame == 196
    assert cm.qwen2_5_vl_7b(448).tokens_per_frame == 128


@pytest.mark.parametrize("name", ["llava", "qwen"])
def test_cost_matched_model(name):
    """The matched CPU model has the reference's tokens per frame exactly, its ratio within the tolerance, is
    CPU-sized, and builds (the configs validate); the ratio is a real one (tens of LLM tokens per frame)."""
    m = cm.cost_matched(name)
    ref = cm.REFERENCES[name]()
    assert m.tokens_per_frame == ref.tokens_per_frame
    assert abs(m.ratio / ref.ratio - 1) <= cm.TOLERANCE
    assert 10 < ref.ratio < 200
    assert m.llm.hidden_size <= 512 and cm.llm_flops_per_token(m.llm) < 1e-3 * cm.llm_flops_per_token(ref.llm)
    if name == "qwen":
        from megatron_longvideo.models.qwen2_5_vl.model import Qwen25VLConfig

        cfg = Qwen25VLConfig(llm=m.llm, vision=m.vision)
        assert cfg.num_video_tokens(2, m.image_size, m.image_size) == 2 * ref.tokens_per_frame
    else:
        assert m.vision.num_video_tokens(2) == 2 * 196 + 1
    with pytest.raises(ValueError, match="no CPU model"):
        cm.cost_matched(name, hiddens=(64,), layers=(1,), tolerance=1e-6)
    assert f"| CPU match `{name}`:" in cm.report(names=(name,))


@pytest.mark.parametrize("name", ["llava", "qwen"])
def test_split_matched_model(name):
    """The split match spends a prompt's forward as the 7B does: its frame ratio and attention per frame are within
    the tolerance of the reference's, so the tower's share of the FLOPs at 1,024 and 4,096 frames is within 10% of
    the 7B's (computed from the formulas, not written in), where the tokens-per-frame match's is a tenth of it or
    less (the reason the split match exists); a few tokens per frame keep 4,096 frames under 20k tokens; the
    configs build with the placeholder counts the benchmark uses; ``matched`` names both kinds."""
    ref = cm.REFERENCES[name]()
    split = cm.split_matched(name)
    plain = cm.cost_matched(name)
    assert split.criterion == "split" and plain.criterion == "tokens"
    assert abs(split.frame_ratio_error) <= cm.TOLERANCE and abs(split.attention_error) <= cm.TOLERANCE
    for frames in (1024, 4096):
        theirs = cm.vision_share(ref.llm, ref.vision, frames, image_size=ref.image_size)
        ours = cm.vision_share(split.llm, split.vision, frames, image_size=split.image_size)
        assert abs(ours / theirs - 1) < 0.10, (frames, ours, theirs)
        assert cm.vision_share(plain.llm, plain.vision, frames, image_size=plain.image_size) < theirs / 10
    assert split.tokens_per_frame * 4096 < 20_000
    # attention per frame: the causal attention over F frames, per token, is F times it the matmuls' FLOPs
    t = split.tokens_per_frame
    direct = cm.llm_flops_per_token(split.llm, context=t * 1000 / 2) / cm.llm_flops_per_token(split.llm) - 1
    assert abs(direct / (1000 * cm.attention_per_frame(split.llm, split.vision, image_size=split.image_size)) - 1) < 1e-9
    if name == "qwen":
        from megatron_longvideo.models.qwen2_5_vl.model import Qwen25VLConfig

        cfg = Qwen25VLConfig(llm=split.llm, vision=split.vision)
        assert cfg.num_video_tokens(2, split.image_size, split.image_size) == round(2 * t)
    else:
        assert split.vision.num_video_tokens(2) == 2 * t + 1
    assert cm.matched(f"{name}-split") == split and cm.matched(name) == plain
    with pytest.raises(ValueError, match="cost match"):
        cm.matched(f"{name}-exact")
    with pytest.raises(ValueError, match="no CPU model"):
        cm.split_matched(name, hiddens=(64,), layers=(2,), tolerance=1e-6)
    table = cm.report(names=(name,))
    assert f"| CPU match `{name}-split`:" in table and f"| CPU match `{name}`:" in table
