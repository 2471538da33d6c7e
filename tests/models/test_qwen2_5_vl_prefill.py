"""MR-SP stage 2 for Qwen2.5-VL: sharded prefill and shared-prefix packing equal the unsharded run.

Two groups (prefixes with a 3-frame 56 x 84 video and a 2-frame one, text after it) of G=3 responses of
unequal lengths. Packed responses must get the multimodal positions they have unpacked (each restarts
where the prefix's text ends, not at the prefix's token count). Per-token log-probs, entropies and the
gradients of a loss over both (LLM and, with the tower trained, tower) equal world=1 unpacked within 1e-5
(gradients: 5e-5 in norm per tensor, see ``GRAD_TOL``).
"""

from __future__ import annotations

import torch

from tests.dist import init_cpu_dist, run_ranks

VOCAB, VIDEO_ID, PAD, TOL = 96, 3, 0, 1e-5
GRAD_TOL = 5e-5
"""Gradients (norm-relative, per tensor): the tower's sum over every token of both videos, reordered by
the CP split and the packing, moved 1.3e-5 (CP=2) and 2.1e-5 (CP=2, p2p, packed) on an AVX2 CPU (AMD
EPYC, 2026-12-01) against under 1e-5 on the machine that first ran this; a real mistake (a lost 1/TP
scale, a misplaced position) shows as 1e-2 or more."""


def _cfg():
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.models.qwen2_5_vl.model import Qwen25VLConfig
    from megatron_longvideo.models.qwen2_5_vl.vision import QwenVisionConfig

    return Qwen25VLConfig(llm=LLMConfig(vocab_size=VOCAB, mrope_section=(2, 3, 3), init_std=0.3),
                          vision=QwenVisionConfig(window_size=56), video_token_id=VIDEO_ID)


def _problem():
    cfg = _cfg()
    g = torch.Generator().manual_seed(5)
    videos = [[torch.randn(3, 3, 56, 84, generator=g)], [torch.randn(2, 3, 56, 84, generator=g)]]
    prefixes = []
    for video, text in zip(videos, (4, 7)):
        n = cfg.num_video_tokens(video[0].shape[0], 56, 84)
        ids = torch.randint(4, VOCAB, (n + text,), generator=g)
        ids[1 : 1 + n] = VIDEO_ID
        prefixes.append(ids)
    responses = [[torch.randint(4, VOCAB, (k,), generator=g) for k in lens] for lens in ((5, 8, 4), (6, 3, 8))]
    return videos, prefixes, responses


def _run(layout, full_weights, pack):
    from megatron_longvideo.checkpoint.full_state import gather_full_state, load_full_state
    from megatron_longvideo.models.prefill import dense_values, prefill_step
    from megatron_longvideo.models.qwen2_5_vl.model import build_qwen25vl
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.rl.packing import build_prefill_batch
    from megatron_longvideo.training.engine import forward_backward, wrap_ddp

    videos, prefixes, responses = _problem()
    config = ParallelConfig(tensor_parallel_size=layout.get("tp", 1), context_parallel_size=layout.get("cp", 1),
                            cp_comm_type=layout.get("cp_comm", "all_gather"))
    groups = initialize_parallel(config, seed=3)
    torch.manual_seed(3)
    model = build_qwen25vl(_cfg(), groups, recompute_activations=layout.get("recompute", False))
    if full_weights is not None:
        load_full_state(model, full_weights, groups)
    weights = gather_full_state(model, groups)
    ddp = wrap_ddp(model, groups)
    batch = build_prefill_batch(prefixes, responses, pack=pack, pad_id=PAD)
    positions = model.prefill_positions(batch, videos)
    n = batch.num_targets
    w, u = torch.linspace(-1.0, 1.0, n), torch.linspace(0.5, -0.3, n)

    def loss_fn(logp, entropy, plan):
        loss = (w[plan.owned] * logp + u[plan.owned] * entropy).sum()
        report = {"logp": dense_values(logp.detach(), plan, n, groups), "entropy": dense_values(entropy.detach(), plan, n, groups)}
        return loss, torch.tensor(plan.owned.numel(), dtype=torch.int), report

    ddp.zero_grad_buffer()
    reports = forward_backward(ddp, prefill_step(groups, batch, videos=videos, pad_id=PAD, loss_fn=loss_fn), [None],
                               seq_length=batch.input_ids.shape[1], micro_batch_size=batch.input_ids.shape[0])
    grads = gather_full_state(ddp, groups, what="grad")
    destroy_parallel()
    # the positions each response token is predicted from, in target order (the same in every layout)
    flat = positions.reshape(3, -1)[:, batch.sources]
    return {"logp": reports[0]["logp"], "entropy": reports[0]["entropy"], "grads": grads, "weights": weights,
            "source_positions": flat}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _norm_rel(a, b):
    """``|a - b| / |b|`` in the Frobenius norm: a gradient is a sum over every token, and fp32 rounding in a
    reordered sum (another CP split, packing) is relative to the whole tensor, not to its largest entry
    (measured: a vision norm's gradient, 500x below the largest, moved 1e-5 of its max between layouts
    on an AVX2 CPU)."""
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _worker(rank, world_size, layouts):
    init_cpu_dist()
    ref = _run({}, None, pack=False)
    out = {}
    for name, (layout, pack) in layouts.items():
        got = _run(layout, ref["weights"], pack)
        assert torch.equal(got["source_positions"], ref["source_positions"]), name
        out[name] = {"logp": _rel(got["logp"], ref["logp"]), "entropy": _rel(got["entropy"], ref["entropy"]),
                     "grad": max(_norm_rel(got["grads"][k], ref["grads"][k]) for k in ref["grads"])}
    zero = [k for k, g in ref["grads"].items() if g.abs().max() == 0]
    return {"results": out, "zero": zero, "delta": int(ref["source_positions"][0, 0]) - int(_problem()[1][0].numel() - 1)}


def test_qwen_prefill_packed_and_sharded_equal_world1():
    layouts = {"cp1_packed": ({}, True), "cp2": ({"cp": 2}, False), "cp2_packed": ({"cp": 2}, True),
               "cp2_p2p_packed": ({"cp": 2, "cp_comm": "p2p"}, True), "cp2_a2a_packed": ({"cp": 2, "cp_comm": "a2a"}, True),
               "tp2_packed": ({"tp": 2}, True), "cp2_packed_recompute": ({"cp": 2, "recompute": True}, True)}
    result = run_ranks(_worker, 2, layouts)[0]
    assert result["zero"] == [], f"vacuous: zero reference gradients {result['zero']}"
    # the first response is predicted from a position below its prefix's last index (the video's 48 tokens
    # span fewer positions): a plain restart at the prefix length, as for 1-D RoPE, would be wrong
    assert result["delta"] < 0, result["delta"]
    bad = {k: v for k, v in result["results"].items()
           if max(v["logp"], v["entropy"]) > TOL or v["grad"] > GRAD_TOL}
    assert not bad, f"differs from the unsharded unpacked run beyond {TOL} (gradients {GRAD_TOL}): {bad}"
