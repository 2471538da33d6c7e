"""MR-SP stage 1 invariance: parallel frame encoding over the encode group equals world=1.

A batch of two samples with different frame counts (7 and 3: not divisible by the group sizes 2 and 4)
and different prompt lengths goes through the whole video-language model (ViT, projector, pooling,
newline, merge, Qwen2 LLM with CP). Merged embeddings, loss and the gradients of the vision tower,
projector, newline and LLM must equal the world=1 run within 1e-5 relative.
"""

from __future__ import annotations

import torch

from tests.dist import init_cpu_dist, run_ranks

VOCAB = 128
VIDEO_ID = 3
SEQ = 48
TOL = 1e-5


def _batch():
    from megatron_longvideo.models.llava_onevision.vision import VisionConfig

    vcfg = VisionConfig()
    g = torch.Generator().manual_seed(3)
    frames = [torch.randn(7, 3, 32, 32, generator=g), torch.randn(3, 3, 32, 32, generator=g)]
    starts = [2, 5]
    ids = torch.randint(4, VOCAB, (2, SEQ + 1), generator=g)
    mask = torch.ones(2, SEQ)
    for i, (f, s) in enumerate(zip(frames, starts)):
        n = vcfg.num_video_tokens(f.shape[0])
        ids[i, s : s + n] = VIDEO_ID
        mask[i, s - 1 : s + n] = 0  # no loss on predicting video tokens
    mask[1, -6:] = 0  # padding of the shorter sample
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": mask, "videos": [[frames[0]], [frames[1]]]}


def _run(layout, full_weights, batch, encode_group="tp_cp", vision=None):
    import torch.distributed as dist

    from megatron_longvideo.checkpoint.full_state import gather_full_state, load_full_state
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.models.llava_onevision.vision import VisionConfig
    from megatron_longvideo.models.llava_onevision.model import VLMConfig, build_vlm
    from megatron_longvideo.models.vlm import vlm_forward
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.training.engine import OptimConfig, build_optimizer, forward_backward, wrap_ddp
    from megatron_longvideo.training.lm_step import cp_shard

    config = ParallelConfig(
        tensor_parallel_size=layout.get("tp", 1), context_parallel_size=layout.get("cp", 1),
        sequence_parallel=layout.get("sp", False), encode_group=encode_group,
    )
    groups = initialize_parallel(config, seed=11)
    torch.manual_seed(11)
    cfg = VLMConfig(llm=LLMConfig.tiny(vocab_size=VOCAB), vision=VisionConfig(**(vision or {})), video_token_id=VIDEO_ID)
    model = build_vlm(cfg, groups)
    if full_weights is not None:
        load_full_state(model, full_weights, groups)
    weights = gather_full_state(model, groups)
    ddp = wrap_ddp(model, groups)
    merged_out = {}

    def step(mb, chunk):
        out, merged = vlm_forward(chunk, groups, input_ids=mb["input_ids"], videos=mb["videos"], labels=mb["labels"], return_merged=True)
        merged_out["embeds"] = merged.embeds.detach().clone()
        mask = cp_shard(mb["loss_mask"], groups)

        def loss_func(losses):
            total = (losses.float() * mask).sum()
            count = mask.sum().to(torch.int)
            return total, count, {"lm loss": torch.stack([total.detach(), count.float()])}

        return out, loss_func

    ddp.zero_grad_buffer()
    reports = forward_backward(ddp, step, [batch], seq_length=SEQ, micro_batch_size=2)
    totals = sum(r["lm loss"] for r in reports)
    dist.all_reduce(totals, group=groups.dp_cp)
    grads = gather_full_state(ddp, groups, what="grad")
    # every replica of the vision tower must hold the same (complete) gradient
    vision_grad = torch.cat([g.reshape(-1) for k, g in sorted(grads.items()) if k.startswith("vision.")])
    spread = torch.zeros(1)
    everyone = [torch.empty_like(vision_grad) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, vision_grad)
    spread[0] = max((e - vision_grad).abs().max() for e in everyone)
    # the gradient norm megatron's optimizer clips by: each replicated tower parameter counted once
    _, grad_norm, _ = build_optimizer([ddp], OptimConfig(lr=0.0, clip_grad=1e9)).step()
    destroy_parallel()
    return {"loss": (totals[0] / totals[1]).item(), "grads": grads, "weights": weights,
            "merged": merged_out["embeds"], "replica_spread": spread.item(), "grad_norm": float(grad_norm)}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _worker(rank, world_size, layouts, vision=None):
    init_cpu_dist()
    batch = _batch()
    ref = _run({}, None, batch, vision=vision)
    out = {}
    for name, (layout, encode_group) in layouts.items():
        got = _run(layout, ref["weights"], batch, encode_group, vision=vision)
        out[name] = {
            "loss": abs(got["loss"] - ref["loss"]) / abs(ref["loss"]),
            "merged": _rel(got["merged"], ref["merged"]),
            "grad": max(_rel(got["grads"][k], ref["grads"][k]) for k in ref["grads"]),
            "vision_grad": max(_rel(got["grads"][k], ref["grads"][k]) for k in ref["grads"] if k.startswith("vision.")),
            "replica_spread": got["replica_spread"],
            "grad_norm": abs(got["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"],
        }
    frozen = (vision or {}).get("freeze", False)
    zero = [k for k, g in ref["grads"].items() if g.abs().max() == 0 and not (frozen and "vision.vit." in k)]
    return {"results": out, "zero_grads": zero, "num_vision": sum(k.startswith("vision.") for k in ref["grads"])}


def _check(result):
    assert result["zero_grads"] == [], f"reference gradients that are zero (vacuous): {result['zero_grads']}"
    assert result["num_vision"] > 10
    bad = {n: r for n, r in result["results"].items() if max(r.values()) > TOL}
    assert not bad, f"differs from world=1 beyond {TOL}: {bad}"


def test_encode_group_of_two_equals_world1():
    layouts = {
        "cp2": ({"cp": 2}, "tp_cp"),
        "tp2": ({"tp": 2}, "tp_cp"),
        "tp2_sp": ({"tp": 2, "sp": True}, "tp_cp"),
    }
    _check(run_ranks(_worker, 2, layouts)[0])


def test_encode_group_of_four_equals_world1():
    layouts = {
        "tp2_cp2": ({"tp": 2, "cp": 2}, "tp_cp"),
        "cp4": ({"cp": 4}, "tp_cp"),
        "tp2_cp2_encode_cp_only": ({"tp": 2, "cp": 2}, "cp"),
    }
    _check(run_ranks(_worker, 4, layouts)[0])


def test_frozen_tower_with_trainable_projector_equals_world1():
    """The usual RL setting: the ViT runs without a graph; projector and newline still get exact grads."""
    result = run_ranks(_worker, 2, {"cp2": ({"cp": 2}, "tp_cp"), "tp2": ({"tp": 2}, "tp_cp")}, {"freeze": True})[0]
    _check(result)
