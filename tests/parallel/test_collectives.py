"""Autograd collectives: forward and backward against a single-process emulation.

Runs on 4 ranks split into the non-contiguous gloo subgroups {0, 2} and {1, 3} (where
``torch.distributed.nn``'s all-gather backward fails). Each rank r of a group holds x_r and computes
loss_r = sum(w_r * y_r) with known w_r; the total loss is the sum over the group. The emulation
builds every x_k and w_k on one process, applies the collective's math and differentiates the total
loss, giving each rank's expected output and input gradient.
"""

from __future__ import annotations

import torch

from tests.dist import init_cpu_dist, run_ranks

N = 2  # group size


def _x(k):
    return torch.arange(24, dtype=torch.float64).reshape(4, 6) * (k + 1) + 0.5 * k


def _w(k, shape):
    n = shape[0] * shape[1]
    return torch.linspace(-1, 1, n, dtype=torch.float64).reshape(shape).roll(k) + 0.1 * k


def _emulate(name):
    """(y_k for every k, dL/dx_k for every k) from the math alone."""
    xs = [_x(k).requires_grad_() for k in range(N)]
    if name == "all_gather_sum":
        ys = [torch.cat(xs, 0) for _ in range(N)]
    elif name in ("all_gather_slice", "all_reduce"):
        # replicated use: every rank computes the same loss from y; the total counts it once
        y = torch.cat(xs, 0) if name == "all_gather_slice" else sum(xs)
        ys = [y for _ in range(N)]
        loss = (_w(0, y.shape) * y).sum()
        loss.backward()
        return ys, [x.grad for x in xs]
    elif name == "reduce_scatter":
        total = sum(xs)
        ys = [total.chunk(N, 0)[k] for k in range(N)]
    elif name == "split":
        ys = [xs[0].chunk(N, 0)[k] for k in range(N)]  # x replicated: rank 0's value on all
    elif name == "copy_to_group":
        ys = [xs[0] for _ in range(N)]
    elif name == "all_to_all":
        # scatter dim 1 (columns), gather dim 0 (rows)
        ys = [torch.cat([xs[j].chunk(N, 1)[k] for j in range(N)], 0) for k in range(N)]
    elif name == "ring_shift":
        ys = [xs[(k - 1) % N] for k in range(N)]
    else:
        raise AssertionError(name)
    loss = sum((_weight(name, k, ys[k]) * ys[k]).sum() for k in range(N))
    loss.backward()
    grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in xs]
    if name in ("split", "copy_to_group"):
        grads = [grads[0]] * N  # replicated input: each rank holds the full gradient
    return ys, grads


def _weight(name, k, y):
    return _w(0 if name in ("all_gather_slice", "all_reduce") else k, y.shape)


def _worker(rank, world_size):
    init_cpu_dist()
    import torch.distributed as dist

    from megatron_longvideo.parallel import collectives as C

    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    group = groups[rank % 2]
    k = dist.get_rank(group)
    ops = {
        "all_gather_sum": lambda x: C.all_gather(x, 0, group),
        "all_gather_slice": lambda x: C.all_gather(x, 0, group, grad_reduce="slice"),
        "reduce_scatter": lambda x: C.reduce_scatter(x, 0, group),
        "split": lambda x: C.split(x, 0, group),
        "all_reduce": lambda x: C.all_reduce(x, group),
        "copy_to_group": lambda x: C.copy_to_group(x, group),
        "all_to_all": lambda x: C.all_to_all(x, 1, 0, group),
        "ring_shift": lambda x: C.ring_shift(x, group),
    }
    errors = {}
    for name, op in ops.items():
        x = (_x(0) if name in ("split", "copy_to_group") else _x(k)).requires_grad_()
        y = op(x)
        (_weight(name, k, y) * y).sum().backward()
        ys, grads = _emulate(name)
        errors[name] = (
            (y.detach() - ys[k].detach()).abs().max().item(),
            (x.grad - grads[k]).abs().max().item(),
            x.grad.abs().max().item(),
        )
    # one-rank groups: the input comes back untouched (no communication, no autograd node)
    x = torch.ones(3, requires_grad=True)
    errors["one_rank_identity"] = all(
        f(x) is x for f in (lambda t: C.all_gather(t, 0, None), lambda t: C.all_to_all(t, 0, 0, None), lambda t: C.ring_shift(t, None))
    )
    return errors


def test_collectives_forward_and_backward_match_emulation():
    results = run_ranks(_worker, 4)
    for rank, errors in enumerate(results):
        assert errors.pop("one_rank_identity") is True
        for name, (fwd, bwd, scale) in errors.items():
            assert fwd == 0.0, f"rank {rank} {name}: forward differs by {fwd}"
            assert bwd < 1e-12, f"rank {rank} {name}: backward differs by {bwd}"
            assert scale > 0, f"rank {rank} {name}: zero gradient, vacuous check"
