"""Qwen2.5-VL under MR-SP: parallel encoding of temporal patches, CP and TP equal world=1.

Two samples, videos of 5 and 3 frames (odd: padded to 3 and 2 temporal patches, 5 units that no group
size divides, so blank units pad the split) of 56 x 84 pixels (2 x 3 merge blocks, 2 windows), at
different places in prompts of different lengths. Merged embeddings, loss, per-token log-probs and every
gradient (tower, merger, LLM; gathered to full shape) equal world=1 within 1e-5 relative, and every rank
holds the same full tower gradient. With ``encode_group="cp"`` and TP = 2 (alone and with CP = 2) the tower
is sharded over TP: its per-rank parameter count is the memory model's, the seed builds the world=1
tower in that layout, and the full-state gather (HF export, weight sync) gives back the world=1 tensors
exactly; with ``"tp_cp"`` it stays replicated.
"""

from __future__ import annotations

import torch

from tests.dist import init_cpu_dist, run_ranks

VOCAB, VIDEO_ID, SEQ, TOL = 128, 3, 64, 1e-5


def _cfg():
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.models.qwen2_5_vl.model import Qwen25VLConfig
    from megatron_longvideo.models.qwen2_5_vl.vision import QwenVisionConfig

    return Qwen25VLConfig(llm=LLMConfig(vocab_size=VOCAB, mrope_section=(2, 3, 3)),
                          vision=QwenVisionConfig(window_size=56, fullatt_block_indexes=(1,)), video_token_id=VIDEO_ID)


def _batch():
    cfg = _cfg()
    g = torch.Generator().manual_seed(3)
    frames = [torch.randn(5, 3, 56, 84, generator=g), torch.randn(3, 3, 56, 84, generator=g)]
    ids = torch.randint(4, VOCAB, (2, SEQ + 1), generator=g)
    mask = torch.ones(2, SEQ)
    for i, (f, s) in enumerate(zip(frames, [2, 7])):
        n = cfg.num_video_tokens(f.shape[0], 56, 84)
        ids[i, s : s + n] = VIDEO_ID
        mask[i, s - 1 : s + n] = 0
    mask[1, -5:] = 0
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": mask, "videos": [[frames[0]], [frames[1]]],
            "seconds": [[0.5], [1.0]]}


def _run(layout, ref, batch, encode_group="tp_cp", cp_type="all_gather"):
    import torch.distributed as dist

    from megatron_longvideo.checkpoint.full_state import gather_full_state, load_full_state
    from megatron_longvideo.memory_model import vision_param_count
    from megatron_longvideo.models.qwen2_5_vl.model import build_qwen25vl, hf_state, qwen_vlm_forward
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.training.engine import forward_backward, wrap_ddp
    from megatron_longvideo.training.lm_step import cp_shard

    config = ParallelConfig(tensor_parallel_size=layout.get("tp", 1), context_parallel_size=layout.get("cp", 1),
                            sequence_parallel=False, encode_group=encode_group, cp_comm_type=cp_type)
    groups = initialize_parallel(config, seed=11)
    torch.manual_seed(11)
    cfg = _cfg()
    model = build_qwen25vl(cfg, groups)
    tower = {"sharded": model.vision.sharded, "count": sum(p.numel() for p in model.vision.parameters()),
             "heads": model.vision.layers[0].self_attention.core_attention.num_heads,
             "predicted": vision_param_count(cfg.vision, cfg.llm.hidden_size,
                                             tensor_parallel=groups.tp_size if model.vision.sharded else 1)}
    seeded = gather_full_state(model.vision, groups)  # the seed's tower, whatever the layout
    if ref is not None:
        tower["seeded"] = max((seeded[k] - ref["seeded"][k]).abs().max().item() for k in ref["seeded"])
        load_full_state(model, ref["weights"], groups)
    weights = gather_full_state(model, groups)
    if ref is not None:  # the gather of the shards is the world=1 state, bit for bit (HF export, weight sync)
        exported = hf_state(model, groups)
        tower["gather"] = (sorted(weights) == sorted(ref["weights"])
                           and all(torch.equal(weights[k], ref["weights"][k]) for k in weights)
                           and sorted(exported) == sorted(ref["hf"])
                           and all(torch.equal(exported[k], ref["hf"][k]) for k in exported))
    ddp = wrap_ddp(model, groups)
    merged_out = {}

    def step(mb, chunk):
        out, merged = qwen_vlm_forward(chunk, groups, input_ids=mb["input_ids"], videos=mb["videos"],
                                       seconds_per_frame=mb["seconds"], labels=mb["labels"], return_merged=True)
        merged_out["embeds"] = merged.embeds.detach().clone()
        merged_out["logprobs"] = -out.detach().float().clone()  # [b, s_local]: log-probs of the labels
        if ref is not None:
            merged_out["ref_logprobs"] = cp_shard(ref["logprobs"], groups)
        mask = cp_shard(mb["loss_mask"], groups)

        def loss_func(losses):
            total = (losses.float() * mask).sum()
            return total, mask.sum().to(torch.int), {"lm loss": torch.stack([total.detach(), mask.sum()])}

        return out, loss_func

    ddp.zero_grad_buffer()
    reports = forward_backward(ddp, step, [batch], seq_length=SEQ, micro_batch_size=2)
    totals = sum(r["lm loss"] for r in reports)
    dist.all_reduce(totals, group=groups.dp_cp)
    grads = gather_full_state(ddp, groups, what="grad")
    vision_grad = torch.cat([g.reshape(-1) for k, g in sorted(grads.items()) if k.startswith("vision.")])
    everyone = [torch.empty_like(vision_grad) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, vision_grad)
    spread = max((e - vision_grad).abs().max().item() for e in everyone)
    out = {"loss": (totals[0] / totals[1]).item(), "grads": grads, "weights": weights, "merged": merged_out["embeds"],
           "spread": spread, "tower": tower, "logprobs": merged_out["logprobs"], "seeded": seeded}
    if ref is None:
        out["hf"] = hf_state(model, groups)
    else:
        out["logprob_err"] = _rel(merged_out["logprobs"], merged_out["ref_logprobs"])
    destroy_parallel()
    return out


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _worker(rank, world_size, layouts):
    init_cpu_dist()
    batch = _batch()
    ref = _run({}, None, batch)
    out = {}
    towers = {}
    for name, (layout, encode_group, cp_type) in layouts.items():
        got = _run(layout, ref, batch, encode_group, cp_type)
        out[name] = {"loss": abs(got["loss"] - ref["loss"]) / abs(ref["loss"]), "merged": _rel(got["merged"], ref["merged"]),
                     "logprobs": got["logprob_err"], "grad": max(_rel(got["grads"][k], ref["grads"][k]) for k in ref["grads"]),
                     "spread": got["spread"]}
        towers[name] = got["tower"]
    zero = [k for k, g in ref["grads"].items() if g.abs().max() == 0]
    return {"results": out, "towers": towers, "ref_tower": ref["tower"], "zero": zero,
            "num_vision": sum(k.startswith("vision.") for k in ref["grads"]), "refused": _refused(world_size)}


def _refused(world_size):
    """The error a tower that TP = 2 cannot shard (intermediate_size 45) raises; checked on 2 ranks only."""
    from megatron_longvideo.models.qwen2_5_vl.vision import QwenVisionConfig, build_qwen_vision_tower
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    if world_size != 2:
        return None
    groups = initialize_parallel(ParallelConfig(tensor_parallel_size=2, encode_group="cp"))
    try:
        build_qwen_vision_tower(QwenVisionConfig(intermediate_size=45), groups)
        return "built"
    except ValueError as e:
        return str(e)
    finally:
        destroy_parallel()


def _check(result, layouts):
    assert result["zero"] == [], f"reference gradients that are zero (vacuous): {result['zero']}"
    assert result["num_vision"] > 10
    bad = {n: r for n, r in result["results"].items() if max(r.values()) > TOL}
    assert not bad, f"differs from world=1 beyond {TOL}: {bad}"
    full = result["ref_tower"]["count"]
    assert not result["ref_tower"]["sharded"] and full == result["ref_tower"]["predicted"]
    for name, tower in result["towers"].items():
        layout, encode_group, _ = layouts[name]
        sharded = encode_group == "cp" and layout.get("tp", 1) > 1
        heads = _cfg().vision.num_heads // (layout["tp"] if sharded else 1)  # the attention engine's local heads
        assert tower["sharded"] == sharded and tower["heads"] == heads, (name, tower)
        assert tower["count"] == tower["predicted"] and (tower["count"] < full if sharded else tower["count"] == full), \
            (name, tower, full)
        assert tower["gather"] and tower["seeded"] == 0.0, (name, tower)


def test_two_ranks_equal_world1():
    layouts = {"cp2": ({"cp": 2}, "tp_cp", "all_gather"), "cp2_p2p": ({"cp": 2}, "tp_cp", "p2p"),
               "cp2_a2a": ({"cp": 2}, "tp_cp", "a2a"), "tp2": ({"tp": 2}, "tp_cp", "all_gather"),
               "tp2_sharded_tower": ({"tp": 2}, "cp", "all_gather")}
    result = run_ranks(_worker, 2, layouts)[0]
    _check(result, layouts)
    assert "vision.intermediate_size=45" in result["refused"] and "encode_group" in result["refused"], result["refused"]


def test_four_ranks_equal_world1():
    layouts = {"tp2_cp2": ({"tp": 2, "cp": 2}, "tp_cp", "all_gather"), "cp4_p2p": ({"cp": 4}, "tp_cp", "p2p"),
               "tp2_cp2_sharded_tower": ({"tp": 2, "cp": 2}, "cp", "all_gather")}
    _check(run_ranks(_worker, 4, layouts)[0], layouts)


def _cache_worker(rank, world_size):
    from megatron_longvideo.models.encode import encode_stats
    from megatron_longvideo.models.qwen2_5_vl.model import build_qwen25vl, qwen_vlm_forward
    from megatron_longvideo.models.video_cache import VideoEmbeddingCache
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    init_cpu_dist()
    groups = initialize_parallel(ParallelConfig(context_parallel_size=2), seed=11)
    torch.manual_seed(11)
    model = build_qwen25vl(_cfg(), groups)
    batch, cache = _batch(), VideoEmbeddingCache()
    keys = [["a"], ["b"]]
    calls = []
    outs = []
    with torch.no_grad():
        for _ in range(3):  # the tower runs once per video, then the cache serves (the rollouts and passes of a step)
            before = encode_stats().calls
            outs.append(qwen_vlm_forward(model, groups, input_ids=batch["input_ids"], videos=batch["videos"],
                                         seconds_per_frame=batch["seconds"], cache=cache, cache_keys=keys))
            calls.append(encode_stats().calls - before)
    destroy_parallel()
    # the tower sharded over TP = 2: a cache miss on one TP rank only (rank 1 clears its cache) makes both
    # encode, since the sharded tower's collectives need every TP rank (a lone encoder would hang)
    groups = initialize_parallel(ParallelConfig(tensor_parallel_size=2, encode_group="cp"), seed=11)
    torch.manual_seed(11)
    model, cache = build_qwen25vl(_cfg(), groups), VideoEmbeddingCache()
    sharded_calls, sharded_outs = [], []
    with torch.no_grad():
        for i in range(3):
            if i == 1 and rank == 1:
                cache.clear()
            before = encode_stats().calls
            sharded_outs.append(qwen_vlm_forward(model, groups, input_ids=batch["input_ids"], videos=batch["videos"],
                                                 seconds_per_frame=batch["seconds"], cache=cache, cache_keys=keys))
            sharded_calls.append(encode_stats().calls - before)
    destroy_parallel()
    return (calls, max((o - outs[0]).abs().max().item() for o in outs),
            sharded_calls, max((o - sharded_outs[0]).abs().max().item() for o in sharded_outs))


def test_embedding_cache_serves_repeat_passes():
    for calls, diff, sharded_calls, sharded_diff in run_ranks(_cache_worker, 2):
        assert calls == [1, 0, 0] and diff == 0.0, (calls, diff)
        assert sharded_calls == [1, 1, 0] and sharded_diff == 0.0, (sharded_calls, sharded_diff)
