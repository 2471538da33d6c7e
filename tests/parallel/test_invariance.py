"""Parallel invariance of the Qwen2-style LM: every layout gives the world=1 loss and gradients.

One spawn per world size runs every layout in turn (destroy + re-initialize inside the process).
The world=1 reference is computed in the same spawn with TP = PP = CP = 1 and every rank holding the
whole batch (the DP all-reduce of identical per-token sums over identical token counts is the
world=1 mean), so it shares the weights and data of the layouts it is compared with.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist import init_cpu_dist, run_ranks

SEQ = 32
BATCH = 2
VOCAB = 256
TOL = 1e-5
STEP_TOL = 5e-5
"""The optimizer step, relative to the largest update: Adam's first step is lr * g / (|g| + eps), whose
derivative lr * eps / (|g| + eps)^2 multiplies a gradient's reduction-order noise (1e-6 here) by up to
max|g| / eps for the gradients near zero; measured 1.2e-5 (DP=2 and micro-batches, AVX2 CPU, 2026-12-01)."""


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _data(seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    mask = torch.ones(BATCH, SEQ)
    mask[1, -5:] = 0  # some tokens without loss
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask}


def _run_layout(layout: dict, full_weights, batches, *, opt_step: bool = False):
    """Build the LM under ``layout``, load ``full_weights`` (None: keep the seeded init), run one
    forward/backward over ``batches`` (list of micro-batches) and return global loss and full grads."""
    import torch.distributed as dist

    from megatron_longvideo.checkpoint.full_state import gather_full_state, load_full_state
    from megatron_longvideo.models.llm import LLMConfig, build_llm
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.training.engine import OptimConfig, build_optimizer, forward_backward, wrap_ddp
    from megatron_longvideo.training.lm_step import lm_loss_step

    config = ParallelConfig(
        tensor_parallel_size=layout.get("tp", 1),
        pipeline_parallel_size=layout.get("pp", 1),
        context_parallel_size=layout.get("cp", 1),
        sequence_parallel=layout.get("sp", False),
        cp_comm_type=layout.get("cp_comm", "all_gather"),
    )
    groups = initialize_parallel(config, seed=1234)
    torch.manual_seed(1234)
    llm = LLMConfig.tiny(vocab_size=VOCAB)
    model = build_llm(llm, groups, core_attention=layout.get("core_attention", "engine"))
    if full_weights is not None:
        load_full_state(model, full_weights, groups)
    weights = gather_full_state(model, groups)
    ddp = wrap_ddp(model, groups, use_distributed_optimizer=layout.get("dist_opt", False))
    # Adam's first step is g / (|g| + eps) elementwise: with a tiny eps the 1e-7 relative noise of another
    # reduction order on near-zero gradients becomes sign flips, so eps is set near the gradient scale.
    optim = OptimConfig(lr=1e-2, adam_eps=1e-3, clip_grad=1.0, use_distributed_optimizer=layout.get("dist_opt", False))
    optimizer = build_optimizer([ddp], optim) if opt_step else None
    ddp.zero_grad_buffer()
    if optimizer is not None:
        optimizer.zero_grad()
    reports = forward_backward(ddp, lm_loss_step(groups), batches, seq_length=SEQ, micro_batch_size=BATCH)
    # global mean-token loss: sums and counts over micro-batches, then over DP x CP, from the last stage
    totals = torch.zeros(2)
    for report in reports:
        totals += report["lm loss"]
    dist.all_reduce(totals, group=groups.dp_cp)
    dist.all_reduce(totals, op=dist.ReduceOp.MAX, group=groups.pp)  # only the last stage has them
    loss = (totals[0] / totals[1]).item()
    grads = gather_full_state(ddp, groups, what="grad")
    after = None
    if optimizer is not None:
        ok, grad_norm, _ = optimizer.step()
        assert ok
        after = gather_full_state(ddp, groups)
    destroy_parallel()
    return {"loss": loss, "grads": grads, "weights": weights, "after": after}


def _compare(ref: dict, got: dict, *, grads: bool = True) -> dict:
    out = {"loss": abs(got["loss"] - ref["loss"]) / abs(ref["loss"])}
    assert ref["grads"].keys() == got["grads"].keys(), set(ref["grads"]) ^ set(got["grads"])
    out["grad_nonzero"] = all(ref["grads"][k].abs().max() > 0 for k in ref["grads"])
    if grads:  # (the distributed optimizer leaves each rank only its reduce-scattered grad shard)
        out["grad"] = max(_rel_err(got["grads"][k], ref["grads"][k]) for k in ref["grads"])
    if ref.get("after") is not None:
        # the update, relative to the largest reference update (weights themselves would hide a wrong step).
        # Not per tensor: an update read back as a difference of fp32 weights carries the weights' rounding
        # (6e-8 of |w|), which on a tensor whose own update is far below lr came to 2e-5 of it (AVX2 CPU,
        # 2026-12-01); a wrong step (a lost scale, a skipped tensor) is off by the update itself.
        updates = {k: ref["after"][k] - ref["weights"][k] for k in ref["after"]}
        scale = max(u.abs().max().item() for u in updates.values())
        out["step"] = max(((got["after"][k] - got["weights"][k]) - u).abs().max().item() for k, u in updates.items()) / scale
        out["stepped"] = sum((ref["after"][k] - ref["weights"][k]).abs().max().item() > 0 for k in ref["after"])
    return out


def _invariance_worker(rank, world_size, layouts):
    init_cpu_dist()
    data = _data()
    ref = _run_layout({}, None, [data])
    results = {}
    for name, layout in layouts.items():
        got = _run_layout(layout, ref["weights"], [data])
        results[name] = _compare(ref, got)
    # DP: world=1 on the doubled batch vs each DP rank on its half, through an optimizer step
    if world_size == 2:
        double = {k: torch.cat([v, v.flip(0)]) for k, v in data.items()}
        ref2 = _run_layout({}, ref["weights"], [double], opt_step=True)
        half = {k: v.chunk(2)[rank] for k, v in double.items()}
        for name, dist_opt in (("dp2", False), ("dp2_distopt", True)):
            got = _run_layout({"dist_opt": dist_opt}, ref["weights"], [half], opt_step=True)
            results[name] = _compare(ref2, got, grads=not dist_opt)
        # two micro-batches on one rank (gradient accumulation) equal one batch of both
        results["microbatches"] = _compare(ref2, _run_layout({}, ref["weights"], [half, {k: v.chunk(2)[1 - rank] for k, v in double.items()}], opt_step=True))
    return results


LAYOUTS_2 = {
    "megatron_attention": {"core_attention": "megatron"},  # our core attention vs megatron's own
    "tp2": {"tp": 2},
    "tp2_sp": {"tp": 2, "sp": True},
    "pp2": {"pp": 2},
    "cp2_all_gather": {"cp": 2, "cp_comm": "all_gather"},
    "cp2_a2a": {"cp": 2, "cp_comm": "a2a"},
    "cp2_p2p": {"cp": 2, "cp_comm": "p2p"},
}
LAYOUTS_4 = {
    "tp2_cp2": {"tp": 2, "cp": 2},
    "tp2_sp_cp2_a2a": {"tp": 2, "sp": True, "cp": 2, "cp_comm": "a2a"},
    "cp4_all_gather": {"cp": 4},
    "cp4_p2p": {"cp": 4, "cp_comm": "p2p"},
    "cp4_a2a": {"cp": 4, "cp_comm": "a2a"},  # 2 KV groups repeated to 4 for Ulysses
    "tp2_sp_cp2_p2p": {"tp": 2, "sp": True, "cp": 2, "cp_comm": "p2p"},
    "pp2_tp2": {"pp": 2, "tp": 2},
}


def _check(results: dict):
    bad = {}
    for name, r in results.items():
        assert r["grad_nonzero"], f"{name}: a reference gradient is all zero, the comparison would be vacuous"
        if "stepped" in r:
            assert r.pop("stepped") > 0, f"{name}: the optimizer step changed no weight"
        errs = {k: v for k, v in r.items() if k != "grad_nonzero"}
        if any(v > (STEP_TOL if k == "step" else TOL) for k, v in errs.items()):
            bad[name] = errs
    assert not bad, f"layouts differ from world=1 beyond {TOL} relative (the step: {STEP_TOL}): {bad}"


def test_two_rank_layouts_equal_world1():
    results = run_ranks(_invariance_worker, 2, LAYOUTS_2)
    assert set(results[0]) == set(LAYOUTS_2) | {"dp2", "dp2_distopt", "microbatches"}
    _check(results[0])


def test_four_rank_layouts_equal_world1():
    results = run_ranks(_invariance_worker, 4, LAYOUTS_4)
    assert set(results[0]) == set(LAYOUTS_4)
    _check(results[0])


def _bad_length_worker(rank, world_size):
    init_cpu_dist()
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.training.lm_step import cp_shard

    groups = initialize_parallel(ParallelConfig(context_parallel_size=2))
    try:
        cp_shard(torch.zeros(1, 30), groups)
    except ValueError as e:
        message = str(e)
    else:
        message = None
    destroy_parallel()
    return message


def test_cp_rejects_length_not_divisible_by_2cp():
    messages = run_ranks(_bad_length_worker, 2)
    assert messages[0] is not None and "30 is not divisible by 4" in messages[0]
