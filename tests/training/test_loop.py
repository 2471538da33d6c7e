"""The shared training loop: exact resume after a stop, and a non-finite loss never applied.

Resume: run A trains 6 steps in one go (saving at step 3); run B stops after step 3 (``exit_interval``,
as a killed job), then a fresh model, optimizer, scheduler and loader (run C, with every RNG reseeded to
garbage) resume from B's latest checkpoint and train to 6. Steps 4-6 must give A's losses and A's final
weights, at CP=2 (plain optimizer) and at DP=2 (distributed optimizer, two micro-batches per step).
"""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch

from megatron_longvideo.training.engine import OptimConfig
from tests.dist import init_cpu_dist, run_ranks
from tests.training.helpers import Run, full_weights, make_data, max_diff

N, M = 3, 3


def _resume_case(data, root, layout, optim, gbs):
    common = dict(train_iters=N + M, global_batch_size=gbs, lr_warmup_iters=1, keep_checkpoints=0)
    run = Run(layout, data)
    a = run.train(optim, save=f"{root}/a", save_interval=N, **common)
    weights_a = full_weights(a.model, run)
    run.close()
    run = Run(layout, data)
    b = run.train(optim, save=f"{root}/b", exit_interval=N, **common)
    run.close()
    torch.manual_seed(999), random.seed(999), np.random.seed(999)
    run = Run(layout, data)
    c = run.train(optim, save=f"{root}/b", **common)
    weights_c = full_weights(c.model, run)
    run.close()
    return {"a": a.losses, "b": b.losses, "c": c.losses, "c_start": c.start_step,
            "weights": max_diff(weights_a, weights_c), "moved": max_diff(weights_a, full_weights_at_init(layout, data))}


def full_weights_at_init(layout, data):
    run = Run(layout, data)
    weights = full_weights(run.model(), run)
    run.close()
    return weights


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _nan_case(data, root):
    """Step 2's loss is NaN: its update must not be applied (parameters at step 3's forward = at step 2's)."""
    handler = _Records()
    logging.getLogger("megatron_longvideo.training.loop").addHandler(handler)
    run = Run({"cp": 2}, data)
    calls, snapshots = [0], {}
    inner = run.step

    def step(batch, model):
        calls[0] += 1
        snapshots[calls[0]] = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        output, loss_func = inner(batch, model)
        if calls[0] != 2:
            return output, loss_func

        def poisoned(losses):
            loss, count, report = loss_func(losses)
            return loss * float("nan"), count, {k: v * torch.tensor([float("nan"), 1.0]) for k, v in report.items()}

        return output, poisoned

    run.step = step
    result = run.train(OptimConfig(lr=1e-2), train_iters=3)
    run.close()
    return {"losses": result.losses, "skipped": result.skipped, "messages": handler.messages,
            "unchanged": (snapshots[3] - snapshots[2]).abs().max().item(),
            "changed": (snapshots[2] - snapshots[1]).abs().max().item()}


def _worker(rank, world_size, data, root):
    from megatron_longvideo.checkpoint.dist_ckpt import close_checkpoint_writer

    init_cpu_dist()
    try:
        return {
            "cp2": _resume_case(data, f"{root}/cp2", {"cp": 2}, OptimConfig(lr=1e-2), gbs=None),
            "dp2_distopt": _resume_case(data, f"{root}/dp2", {}, OptimConfig(lr=1e-2, use_distributed_optimizer=True),
                                        gbs=4),
            "nan": _nan_case(data, root),
        }
    finally:
        close_checkpoint_writer()


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    data = make_data(str(tmp_path_factory.mktemp("loop_data")))
    return run_ranks(_worker, 2, data, str(tmp_path_factory.mktemp("loop_ckpt")))[0]


@pytest.mark.parametrize("case", ["cp2", "dp2_distopt"])
def test_resume_after_stop_equals_uninterrupted(result, case):
    r = result[case]
    assert sorted(r["b"]) == [1, 2, 3], f"run B should stop after step {N}: {r['b']}"
    assert r["c_start"] == N and sorted(r["c"]) == [4, 5, 6]
    assert r["moved"] > 1e-4, "training did not change the weights: the comparison would be vacuous"
    for step in (4, 5, 6):
        assert abs(r["c"][step] - r["a"][step]) <= 1e-6, f"step {step}: resumed {r['c'][step]} vs {r['a'][step]}"
    assert r["weights"] <= 1e-6, f"final weights differ by {r['weights']}"


def test_nonfinite_loss_skips_the_update(result):
    r = result["nan"]
    assert r["skipped"] == [2]
    assert r["unchanged"] == 0.0, "the NaN step changed the parameters"
    assert r["changed"] > 0, "a normal step did not change the parameters (vacuous check)"
    assert all(np.isfinite(r["losses"][s]) for s in (1, 3)), r["losses"]
    assert any("step 2" in m and "skipped" in m for m in r["messages"]), r["messages"]
