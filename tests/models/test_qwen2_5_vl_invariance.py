"""Qwen2.5-VL under MR-SP: parallel encoding of temporal patches, CP and TP equal world=1.

Two samples, videos of 5 and 3 frames (odd: padded to 3 and 2 temporal patches, 5 units that no group
size divides, so blank units pad the split) of 56 x 84 pixels (2 x 3 merge blocks, 2 windows), at
different places in prompts of different lengths. Merged embeddings, loss and every gradient (tower,
merger, LLM) equal world=1 within 1e-5 relative, and every replica of the tower holds the same gradient.
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


def _run(layout, full_weights, batch, encode_group="tp_cp", cp_type="all_gather"):
    import torch.distributed as dist

    from megatron_longvideo.checkpoint.full_state import gather_full_state, load_full_state
    from megatron_longvideo.models.qwen2_5_vl.model import build_qwen25vl, qwen_vlm_forward
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.training.engine import forward_backward, wrap_ddp
    from megatron_longvideo.training.lm_step import cp_shard

    config = ParallelConfig(tensor_parallel_size=layout.get("tp", 1), context_parallel_size=layout.get("cp", 1),
                            sequence_parallel=False, encode_group=encode_group, cp_comm_type=cp_type)
    groups = initialize_parallel(config, seed=11)
    torch.manual_seed(11)
    model = build_qwen25vl(_cfg(), groups)
    if full_weights is not None:
        load_full_state(model, full_weights, groups)
    weights = gather_full_state(model, groups)
    ddp = wrap_ddp(model, groups)
    merged_out = {}

    def step(mb, chunk):
        out, merged = qwen_vlm_forward(chunk, groups, input_ids=mb["input_ids"], videos=mb["videos"],
                                       seconds_per_frame=mb["seconds"], labels=mb["labels"], return_merged=True)
        merged_out["embeds"] = merged.embeds.detach().clone()
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
    destroy_parallel()
    return {"loss": (totals[0] / totals[1]).item(), "grads": grads, "weights": weights, "merged": merged_out["embeds"],
            "spread": spread}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _worker(rank, world_size, layouts):
    init_cpu_dist()
    batch = _batch()
    ref = _run({}, None, batch)
    out = {}
    for name, (layout, encode_group, cp_type) in layouts.items():
        got = _run(layout, ref["weights"], batch, encode_group, cp_type)
        out[name] = {"loss": abs(got["loss"] - ref["loss"]) / abs(ref["loss"]), "merged": _rel(got["merged"], ref["merged"]),
                     "grad": max(_rel(got["grads"][k], ref["grads"][k]) for k in ref["grads"]), "spread": got["spread"]}
    zero = [k for k, g in ref["grads"].items() if g.abs().max() == 0]
    return {"results": out, "zero": zero, "num_vision": sum(k.startswith("vision.") for k in ref["grads"])}


def _check(result):
    assert result["zero"] == [], f"reference gradients that are zero (vacuous): {result['zero']}"
    assert result["num_vision"] > 10
    bad = {n: r for n, r in result["results"].items() if max(r.values()) > TOL}
    assert not bad, f"differs from world=1 beyond {TOL}: {bad}"


def test_two_ranks_equal_world1():
    layouts = {"cp2": ({"cp": 2}, "tp_cp", "all_gather"), "cp2_p2p": ({"cp": 2}, "tp_cp", "p2p"),
               "cp2_a2a": ({"cp": 2}, "tp_cp", "a2a"), "tp2": ({"tp": 2}, "tp_cp", "all_gather"),
               "tp2_encode_cp": ({"tp": 2}, "cp", "all_gather")}
    _check(run_ranks(_worker, 2, layouts)[0])


def test_four_ranks_equal_world1():
    layouts = {"tp2_cp2": ({"tp": 2, "cp": 2}, "tp_cp", "all_gather"), "cp4_p2p": ({"cp": 4}, "tp_cp", "p2p")}
    _check(run_ranks(_worker, 4, layouts)[0])


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
    return calls, max((o - outs[0]).abs().max().item() for o in outs)


def test_embedding_cache_serves_repeat_passes():
    for calls, diff in run_ranks(_cache_worker, 2):
        assert calls == [1, 0, 0] and diff == 0.0, (calls, diff)
