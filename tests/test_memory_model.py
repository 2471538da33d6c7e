"""The memory model: parameter counts equal the built models', and predictions move the way the
layouts do (the check against measured peaks is in ``benchmarks/grpo_step.py``'s report)."""

from __future__ import annotations

import pytest
import torch

from tests.dist import init_cpu_dist, run_ranks


def _count_worker(rank, world_size, configs):
    init_cpu_dist()
    from megatron_longvideo.models.llava_onevision.model import VLMConfig, build_vlm
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    groups = initialize_parallel(ParallelConfig())
    out = []
    for llm, vision in configs:
        model = build_vlm(VLMConfig(llm=llm, vision=vision, video_token_id=3), groups)
        out.append((sum(p.numel() for p in model.llm.parameters()), sum(p.numel() for p in model.vision.parameters())))
    destroy_parallel()
    return out


def test_param_counts_match_built_models():
    from megatron_longvideo.memory_model import llm_param_count, vision_param_count
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.models.llava_onevision.vision import VisionConfig

    configs = [
        (LLMConfig.tiny(vocab_size=304), VisionConfig()),
        (LLMConfig.tiny(vocab_size=304, hidden_size=128, ffn_hidden_size=512, num_layers=3, tie_word_embeddings=True),
         VisionConfig(pooling="merge2x2", image_size=64, hidden_size=64, ffn_hidden_size=96, newline=False)),
    ]
    built = run_ranks(_count_worker, 1, configs)[0]
    for (llm, vision), (n_llm, n_vis) in zip(configs, built):
        assert llm_param_count(llm) == n_llm
        assert vision_param_count(vision, llm.hidden_size) == n_vis


def test_predictions_follow_the_layouts():
    from megatron_longvideo.memory_model import StepLayout, max_frames, predict_step_memory
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.models.llava_onevision.vision import VisionConfig

    llm, vision = LLMConfig.qwen2_7b(), VisionConfig.siglip_so400m()
    gpu = dict(ranks=8, group_size=8, response_len=512, act_bytes=2, param_bytes=2, grad_bytes=2, optimizer_bytes=12,
               distributed_optimizer=True, attention="engine", recompute=True, reference="offloaded", engine="sleep",
               engine_prefix_sharing=True, engine_bytes=2)
    est = {m: predict_step_memory(llm, vision, 512, StepLayout(mode=m, **gpu)) for m in
           ("baseline", "stage1", "stage12", "stage12_packed")}
    # sharding the sequence over 8 CP ranks cuts the update pass's activations
    assert est["stage12"].phases["update"] < est["stage1"].phases["update"] / 4
    # the cache keeps one copy of the embeddings; the baseline re-encodes (more encode work, not memory)
    assert est["stage1"].static == est["baseline"].static
    # more frames never need less memory
    layout = StepLayout(mode="stage12_packed", **gpu)
    peaks = [predict_step_memory(llm, vision, f, layout).peak for f in (64, 256, 1024, 4096)]
    assert peaks == sorted(peaks)
    # max_frames is the boundary of the prediction
    cap = 80 * 2**30
    n = max_frames(llm, vision, layout, cap)
    assert 0 < n < 8192
    assert predict_step_memory(llm, vision, n, layout).peak <= cap < predict_step_memory(llm, vision, n + 1, layout).peak
    with pytest.raises(ValueError, match="group_size"):
        StepLayout(mode="baseline", ranks=3, group_size=8, response_len=4)


def _layer_worker(rank, world_size, shapes, tokens):
    """Bytes one more layer keeps for the backward (the live tensors after a forward with 2 layers, less with 1),
    per shape ``(hidden, ffn, heads, kv_heads, dtype name, mrope_section)``."""
    init_cpu_dist()
    from megatron_longvideo.attention.layout import SequenceLayout
    from megatron_longvideo.memory_meter import LiveTensorMeter
    from megatron_longvideo.models.llm import LLMConfig, build_llm, lm_forward
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    groups = initialize_parallel(ParallelConfig(tensor_parallel_size=world_size))
    out = []
    for hidden, ffn, heads, kv_heads, dtype, mrope in shapes:
        dtype = getattr(torch, dtype)
        live = []
        for layers in (1, 2):
            llm = LLMConfig.tiny(vocab_size=304, hidden_size=hidden, ffn_hidden_size=ffn, num_layers=layers,
                                 num_attention_heads=heads, num_query_groups=kv_heads, mrope_section=mrope)
            model = build_llm(llm, groups, params_dtype=dtype)
            positions = torch.arange(tokens)[None]
            if mrope:
                positions = positions[None].expand(3, 1, tokens).contiguous()
            embeddings = torch.randn(tokens, 1, hidden, dtype=dtype, requires_grad=True)
            with LiveTensorMeter() as meter:
                loss = lm_forward(model, decoder_input=embeddings, position_ids=positions,
                                  labels=torch.randint(0, 304, (1, tokens)), layout=SequenceLayout.plain(tokens))
                live.append(meter.live)
            del loss
        out.append(live[1] - live[0])
    destroy_parallel()
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_layer_activations_match_the_built_layer(tp):
    """What the model says a layer keeps for its backward per token (outside the attention core, plus the core's
    saved lse) is what the built layer keeps, in fp32 and bf16, for a narrow and a wide MLP and with Qwen2.5-VL's
    3-D rotary positions: within 1%."""
    from megatron_longvideo.memory_model import _layer_saved, attention_terms
    from megatron_longvideo.models.llm import LLMConfig

    tokens = 512
    shapes = [(64, 128, 4, 2, "float32", None), (72, 384, 4, 2, "float32", None), (72, 384, 4, 2, "bfloat16", None),
              (120, 480, 4, 2, "bfloat16", (5, 5, 5))]
    measured = run_ranks(_layer_worker, tp, shapes, tokens)[0]
    for (hidden, ffn, heads, kv_heads, dtype, mrope), got in zip(shapes, measured):
        a = 4 if dtype == "float32" else 2
        llm = LLMConfig.tiny(hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                             num_query_groups=kv_heads, mrope_section=mrope)
        saved, _, _ = attention_terms(llm, tokens, cp=1, tp=tp, act_bytes=a)
        predicted = tokens * _layer_saved(llm, tp, a) + saved
        assert abs(predicted / got - 1) < 0.01, (hidden, ffn, dtype, mrope, predicted, got)


def _attention_worker(rank, world_size, seq_len):
    """Measured bytes of one attention layer (live after forward, forward peak, forward+backward peak)."""
    init_cpu_dist()
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from attention import _module

    from megatron_longvideo.attention.layout import SequenceLayout
    from megatron_longvideo.memory_meter import LiveTensorMeter
    from megatron_longvideo.parallel.context import SequenceContext
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    groups = initialize_parallel(ParallelConfig(context_parallel_size=world_size))
    t = seq_len // world_size
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for kv_heads in (2, 4):
            for mode in ("all_gather", "a2a", "p2p") if world_size > 1 else ("all_gather",):
                context = SequenceContext()
                attn = _module(mode, 4, kv_heads, 32, groups, context)
                q, k, v = (torch.randn(t, 1, n, 32).to(dtype).requires_grad_(True) for n in (4, kv_heads, kv_heads))
                grad = torch.randn(t, 1, 128).to(dtype)
                runs = []
                for _ in range(4):  # a warm-up, then three measured runs
                    with LiveTensorMeter() as meter:
                        with context.use(layout=SequenceLayout.plain(seq_len)):
                            o = attn(q, k, v, None)
                        after, forward_peak = meter.live, meter.peak
                        o.backward(grad)
                    q.grad = k.grad = v.grad = o = None
                    runs.append((after, forward_peak, meter.peak))
                # gloo frees its buffers from its own threads, so a run may still count a previous exchange's
                # buffer: that excess only adds, and the smallest of the measured runs leaves it out
                out[(str(dtype), kv_heads, mode)] = tuple(min(r[i] for r in runs[1:]) for i in range(3))
    destroy_parallel()
    return out


def test_attention_terms_match_the_measured_layer():
    from megatron_longvideo.memory_model import attention_terms
    from megatron_longvideo.models.llm import LLMConfig

    seq_len = 1024
    bad = {}
    for cp in (1, 2, 4):
        measured = run_ranks(_attention_worker, cp, seq_len)[0]
        for (dtype, kv_heads, mode), (after, forward_peak, peak) in measured.items():
            a = 4 if dtype == "torch.float32" else 2
            llm = LLMConfig.tiny(hidden_size=128, num_attention_heads=4, num_query_groups=kv_heads)
            t = seq_len // cp
            saved, forward, backward = attention_terms(llm, t, cp=cp, mode=mode, act_bytes=a)
            out = t * 128 * a
            predicted = (saved + out, saved + forward, saved + out + backward)
            ratios = [p / m for p, m in zip(predicted, (after, forward_peak, peak))]
            # gloo releases its all-to-all / send buffers from its own threads, so what is live at a given
            # moment varies by up to about one activation-sized buffer between runs
            if any(abs(r - 1) > 0.25 for r in ratios):
                bad[(cp, dtype, kv_heads, mode)] = [round(r, 3) for r in ratios]
    assert not bad, f"predicted / measured outside 25%: {bad}"


QWEN25_VL_7B = {  # Qwen2.5-VL-7B's shape
    "text_config": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 128000,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}},
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
                      "fullatt_block_indexes": [7, 15, 23, 31], "window_size": 112, "tokens_per_second": 2},
    "video_token_id": 151656, "image_token_id": 151655,
}


def _qwen_count_worker(rank, world_size, cfgs):
    from megatron_longvideo.models.qwen2_5_vl.model import build_qwen25vl
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    init_cpu_dist()
    groups = initialize_parallel(ParallelConfig())
    out = []
    for cfg, meta in cfgs:
        with torch.device("meta" if meta else "cpu"):
            model = build_qwen25vl(cfg, groups, device="cpu")
        out.append((sum(p.numel() for p in model.llm.parameters()), sum(p.numel() for p in model.vision.parameters())))
    destroy_parallel()
    return out


def test_qwen25vl_counts_and_predictions():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_longvideo.memory_model import StepLayout, llm_param_count, max_frames, predict_step_memory, vision_param_count
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.models.qwen2_5_vl.model import Qwen25VLConfig, qwen25vl_config_from_hf
    from megatron_longvideo.models.qwen2_5_vl.vision import QwenVisionConfig

    config = Qwen2_5_VLConfig(**QWEN25_VL_7B)
    with torch.device("meta"):
        hf_count = sum(p.numel() for p in Qwen2_5_VLForConditionalGeneration(config).parameters())
    seven = qwen25vl_config_from_hf(config)
    tiny = Qwen25VLConfig(llm=LLMConfig(vocab_size=304, mrope_section=(2, 3, 3)),
                          vision=QwenVisionConfig(intermediate_size=40, fullatt_block_indexes=(0,)))
    built = run_ranks(_qwen_count_worker, 1, [(tiny, False), (seven, True)])[0]
    for cfg, (n_llm, n_vis) in zip((tiny, seven), built):
        assert llm_param_count(cfg.llm) == n_llm and vision_param_count(cfg.vision, cfg.llm.hidden_size) == n_vis
    assert sum(built[1]) == hf_count  # the 7B shape: every transformers parameter, nothing carried aside

    gpu = dict(ranks=8, group_size=8, response_len=512, act_bytes=2, param_bytes=2, grad_bytes=2, optimizer_bytes=12,
               distributed_optimizer=True, attention="engine", recompute=True, reference="offloaded", engine="sleep",
               engine_prefix_sharing=True, engine_bytes=2)
    layout = StepLayout(mode="stage12_packed", **gpu)
    with pytest.raises(ValueError, match="image_size"):
        predict_step_memory(seven.llm, seven.vision, 64, layout)
    peaks = [predict_step_memory(seven.llm, seven.vision, f, layout, image_size=448).peak for f in (64, 256, 1024)]
    assert peaks == sorted(peaks)
    cap = 80 * 2**30
    n = max_frames(seven.llm, seven.vision, layout, cap, image_size=448)
    assert 0 < n < 8192
    assert predict_step_memory(seven.llm, seven.vision, n, layout, image_size=448).peak <= cap
