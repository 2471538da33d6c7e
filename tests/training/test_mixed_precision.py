"""Mixed precision on CPU: bf16 / fp16 steps track fp32, and parallel layouts in bf16 equal bf16 world=1.

Tolerances. bf16 keeps 8 significant bits (unit roundoff 2^-9 = 2e-3 per rounding); fp16 keeps 11.
Measured on this model (2 layers, one micro-batch of 2 x 32 tokens, three Adam steps): the bf16 loss
differs from fp32 by up to 1.0e-4 relative (fp16: 7e-6) and each parameter's first gradient by up to
8e-3 (fp16: 1.1e-3; norm of the difference / norm);
TP=2, TP=2+SP, CP=2 (all_gather, p2p) in bf16 differ from bf16 world=1 by 1.5-3.3e-5 (loss) and
0.65-0.9e-2 (gradients): the same size as bf16's own rounding, since a different reduction order
rounds different partial sums. A layout that were wrong (a missed tile, a gradient reduced twice)
would be off by order 1. We assert 1e-3 on losses and 3e-2 on gradients: several times the measured
noise, far below any real error. The distributed optimizer (fp32 main weights sharded over DP=2) is
checked over three bf16 steps against bf16 world=1. fp16 uses loss scaling (megatron's dynamic scaler, here starting at
2^10 so that the first step does not overflow); its gradients are compared after unscaling.
"""

from __future__ import annotations

import torch

from tests.dist import init_cpu_dist, run_ranks
from tests.parallel.test_invariance import BATCH, SEQ, VOCAB, _data

LOSS_TOL, GRAD_TOL = 1e-3, 3e-2  # measured: loss <= 3.3e-5 (bf16 layouts), 1.0e-4 (bf16 after 3 steps); grads <= 9e-3


def _run(layout, weights, dtype, data, *, steps=1, dist_opt=False):
    import torch.distributed as dist

    from megatron_longvideo.checkpoint.full_state import gather_full_state, load_full_state
    from megatron_longvideo.models.llm import LLMConfig, build_llm
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.training.engine import OptimConfig, build_optimizer, forward_backward, wrap_ddp
    from megatron_longvideo.training.lm_step import lm_loss_step

    config = ParallelConfig(tensor_parallel_size=layout.get("tp", 1), context_parallel_size=layout.get("cp", 1),
                            sequence_parallel=layout.get("sp", False), cp_comm_type=layout.get("cp_comm", "all_gather"))
    groups = initialize_parallel(config, seed=1234)
    torch.manual_seed(1234)
    model = build_llm(LLMConfig.tiny(vocab_size=VOCAB), groups, params_dtype=dtype)
    if weights is not None:
        load_full_state(model, weights, groups)
    start = gather_full_state(model, groups)
    ddp = wrap_ddp(model, groups, use_distributed_optimizer=dist_opt)
    optimizer = build_optimizer([ddp], OptimConfig(lr=1e-3, adam_eps=1e-3, initial_loss_scale=2.0**10,
                                                   use_distributed_optimizer=dist_opt))
    losses, grads, scales = [], None, []
    for step in range(steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(ddp, lm_loss_step(groups), [data], seq_length=SEQ, micro_batch_size=BATCH)
        totals = torch.zeros(2)
        for report in reports:
            totals += report["lm loss"].float()
        dist.all_reduce(totals, group=groups.dp_cp)
        losses.append((totals[0] / totals[1]).item())
        scale = float(optimizer.get_loss_scale())
        scales.append(scale)
        if step == 0 and not dist_opt:  # main (fp32) gradients, unscaled (the distributed optimizer shards them)
            grads = {k: v.float() / scale for k, v in gather_full_state(ddp, groups, what="grad").items()}
        ok, _, _ = optimizer.step()
        assert ok, f"{dtype} step {step} was skipped (overflow at loss scale {scale})"
    kinds = {str(p.dtype) for p in ddp.parameters()}
    destroy_parallel()
    return {"losses": losses, "grads": grads, "weights": {k: v.float() for k, v in start.items()}, "scales": scales,
            "param_dtypes": kinds, "module": type(ddp.module).__name__}


def _rel_loss(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def _rel_grads(a, b):
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() for k in b)


def _worker(rank, world_size):
    init_cpu_dist()
    data = _data()
    out = {}
    fp32 = _run({}, None, torch.float32, data, steps=3)
    bf16 = _run({}, fp32["weights"], torch.bfloat16, data, steps=3)
    fp16 = _run({}, fp32["weights"], torch.float16, data, steps=3)
    out["wrapped"] = (bf16["module"], bf16["param_dtypes"], fp16["param_dtypes"], fp32["module"])
    out["bf16"] = (_rel_loss(bf16["losses"], fp32["losses"]), _rel_grads(bf16["grads"], fp32["grads"]))
    out["fp16"] = (_rel_loss(fp16["losses"], fp32["losses"]), _rel_grads(fp16["grads"], fp32["grads"]))
    out["fp16_scale"] = fp16["scales"][0]
    out["learned"] = fp32["losses"][-1] < fp32["losses"][0] and bf16["losses"][-1] < bf16["losses"][0]
    if world_size == 2:
        for name, layout in (("tp2", {"tp": 2}), ("tp2_sp", {"tp": 2, "sp": True}), ("cp2", {"cp": 2}),
                             ("cp2_p2p", {"cp": 2, "cp_comm": "p2p"})):
            got = _run(layout, fp32["weights"], torch.bfloat16, data)
            out[name] = (_rel_loss(got["losses"], bf16["losses"][:1]), _rel_grads(got["grads"], bf16["grads"]))
        # DP=2 (each rank the same micro-batch: the DP mean is the world=1 loss) with the distributed
        # optimizer sharding the fp32 main weights: three steps track bf16 world=1's
        got = _run({}, fp32["weights"], torch.bfloat16, data, steps=3, dist_opt=True)
        out["dp2_distopt"] = (_rel_loss(got["losses"], bf16["losses"]), 0.0)
    return out


def test_bf16_and_fp16_track_fp32_and_bf16_layouts_equal_bf16_world1():
    out = run_ranks(_worker, 2)[0]
    module, bf16_dtypes, fp16_dtypes, fp32_module = out.pop("wrapped")
    assert module == "Float16Module" and bf16_dtypes == {"torch.bfloat16"} and fp16_dtypes == {"torch.float16"}
    assert fp32_module != "Float16Module"
    assert out.pop("fp16_scale") == 2.0**10, "fp16 runs with a loss scale"
    assert out.pop("learned"), "three steps should lower the loss (the comparison would be vacuous otherwise)"
    bad = {name: (loss, grad) for name, (loss, grad) in out.items() if loss > LOSS_TOL or grad > GRAD_TOL}
    assert not bad, f"beyond loss {LOSS_TOL} / gradient {GRAD_TOL} relative: {bad}"
