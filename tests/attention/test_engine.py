"""Every CPU kernel backend, under every CP placement, equals the dense oracle (out, lse, dq/dk/dv).

CP is simulated in one process: global q/k/v are cut into each rank's zigzag chunks exactly as the CP
modes place them (all_gather: own queries vs gathered keys; a2a: the gathered sequence; p2p: own
queries vs one rank's block per ring step, accumulated with the engine's forward/backward halves), and
the per-rank results are put back together. The multi-rank tests (tests/parallel, tests/models) prove
the same through real collectives inside the model.
"""

from __future__ import annotations

import random

import pytest
import torch

from megatron_longvideo.attention.backends import BACKENDS, get_backend
from megatron_longvideo.attention.dense import chunk_index, dense_attention, visible_mask
from megatron_longvideo.attention.engine import new_accumulators, tile_attention, tile_backward, tile_forward
from megatron_longvideo.attention.layout import SequenceLayout, gathered_chunks, rank_chunks
from megatron_longvideo.attention.tiles import plan_tiles
from tests.attention.test_tiles import random_packed_segments

SCALE = 0.3
CPU_BACKENDS = ("cpu_flash", "dense", "dense_recompute")


def _problem(layout, batch, heads, kv_heads, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    s = layout.seq_len
    # megatron's memory layout [s, b, h, d], viewed as [b, h, s, d]
    q, k, v = (torch.randn(s, batch, n, dim, generator=g, dtype=torch.float64).to(dtype).permute(1, 2, 0, 3)
               for n in (heads, kv_heads, kv_heads))
    dout = torch.randn(batch, heads, s, dim, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, dout


def _oracle(layout, q, k, v, dout, segments=None):
    qd, kd, vd = (x.double().detach().requires_grad_(True) for x in (q, k, v))
    idx = torch.arange(layout.seq_len)
    out, lse = dense_attention(qd, kd, vd, visible_mask(layout, q.shape[0], idx, idx, segments), SCALE)
    grads = torch.autograd.grad(out, (qd, kd, vd), dout.double())
    return out, lse, grads


def _simulated_cp(layout, mode, cp, q, k, v, dout, backend):
    """(out, lse, dq, dk, dv) over the whole sequence, assembled from every simulated CP rank."""
    b, s = q.shape[0], layout.seq_len
    s_local = s // cp
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(q.shape, dtype=acc)
    lse = torch.zeros(q.shape[:3], dtype=acc)
    dq, dk, dv = torch.zeros(q.shape, dtype=acc), torch.zeros(k.shape, dtype=acc), torch.zeros(k.shape, dtype=acc)
    if mode == "a2a":  # every rank: the whole (gathered) sequence on its heads; heads are independent
        chunks = gathered_chunks(s_local, cp)
        idx = chunk_index(chunks)
        plan = plan_tiles(layout, b, chunks, chunks)
        qi, ki, vi = (x[:, :, idx].detach().requires_grad_(True) for x in (q, k, v))
        o = tile_attention(qi, ki, vi, plan, scale=SCALE, backend=backend)
        _, l = tile_attention(qi, ki, vi, plan, scale=SCALE, backend=backend, return_lse=True)
        gq, gk, gv = torch.autograd.grad(o, (qi, ki, vi), dout[:, :, idx])
        out[:, :, idx], lse[:, :, idx] = o.to(acc), l
        dq[:, :, idx], dk[:, :, idx], dv[:, :, idx] = gq.to(acc), gk.to(acc), gv.to(acc)
        return out, lse, dq, dk, dv
    for r in range(cp):
        mine = rank_chunks(s_local, cp, r)
        qi_idx = chunk_index(mine)
        qi = q[:, :, qi_idx]
        if mode == "all_gather":
            kc = gathered_chunks(s_local, cp)
            k_idx = chunk_index(kc)
            plan = plan_tiles(layout, b, mine, kc)
            qg, kg, vg = (x.detach().requires_grad_(True) for x in (qi, k[:, :, k_idx], v[:, :, k_idx]))
            o = tile_attention(qg, kg, vg, plan, scale=SCALE, backend=backend)
            _, l = tile_attention(qg, kg, vg, plan, scale=SCALE, backend=backend, return_lse=True)
            gq, gk, gv = torch.autograd.grad(o, (qg, kg, vg), dout[:, :, qi_idx])
            out[:, :, qi_idx], lse[:, :, qi_idx], dq[:, :, qi_idx] = o.to(acc), l, gq.to(acc)
            dk[:, :, k_idx] += gk.to(acc)
            dv[:, :, k_idx] += gv.to(acc)
        else:  # p2p: the ring's steps, through the engine's two halves
            o_acc, l_acc = new_accumulators(qi)
            steps = []
            for t in range(cp):
                kc = rank_chunks(s_local, cp, (r - t) % cp)
                k_idx = chunk_index(kc)
                plan = plan_tiles(layout, b, mine, kc)
                aux = tile_forward(qi, k[:, :, k_idx], v[:, :, k_idx], plan, SCALE, backend, o_acc, l_acc,
                                   fresh=t == 0)  # as the ring: step 0 writes fresh accumulators
                steps.append((k_idx, plan, aux))
            o = o_acc.to(q.dtype)
            gq = torch.zeros(qi.shape, dtype=acc)
            for k_idx, plan, aux in steps:
                gk = torch.zeros(k.shape[0], k.shape[1], k_idx.numel(), k.shape[3], dtype=acc)
                gv = torch.zeros_like(gk)
                tile_backward(dout[:, :, qi_idx], qi, k[:, :, k_idx], v[:, :, k_idx], o, l_acc, plan, SCALE, backend,
                              aux, gq, gk, gv)
                dk[:, :, k_idx] += gk
                dv[:, :, k_idx] += gv
            out[:, :, qi_idx], lse[:, :, qi_idx], dq[:, :, qi_idx] = o.to(acc), l_acc, gq
    return out, lse, dq, dk, dv


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_backends_equal_the_dense_oracle_under_every_cp_placement(backend, cp):
    rng = random.Random(10 + cp)
    be = BACKENDS[backend]
    for trial in range(3):
        seq_len = 2 * cp * rng.randint(3, 8)
        rows = rng.randint(1, 2)
        kind = ("packed", "plain", "bidirectional")[trial % 3]
        segments = None
        if kind == "packed":
            segments = random_packed_segments(rng, seq_len, rows)
            layout = SequenceLayout.from_segments(segments)
        else:
            layout = SequenceLayout.plain(seq_len, causal=kind == "plain")
        heads, kv_heads = rng.choice([(4, 2), (4, 4), (6, 3)])
        q, k, v, dout = _problem(layout, rows, heads, kv_heads, 16, torch.float64, trial)
        ref_out, ref_lse, ref_grads = _oracle(layout, q, k, v, dout, segments)
        for mode in ("all_gather", "a2a", "p2p") if cp > 1 else ("all_gather",):
            out, lse, *grads = _simulated_cp(layout, mode, cp, q, k, v, dout, be)
            errs = {"out": _rel(out, ref_out), "lse": _rel(lse, ref_lse)}
            errs.update({n: _rel(g, r) for n, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
            assert max(errs.values()) < 1e-10, (backend, cp, trial, kind, mode, errs)


def test_low_precision_inputs_match_the_oracle_with_fp32_accumulators_and_lse():
    layout = SequenceLayout.from_segments(torch.tensor([[0] * 40 + [1] * 12 + [2] * 9 + [-1] * 3]))
    be = BACKENDS["cpu_flash"]
    for dtype in (torch.bfloat16, torch.float16):  # the merge accumulates in fp32 whatever the inputs
        out_acc, lse_acc = new_accumulators(torch.zeros(1, 2, 4, 8, dtype=dtype))
        assert out_acc.dtype == torch.float32 and lse_acc.dtype == torch.float32
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float16, 4e-3), (torch.float32, 1e-5)):
        q, k, v, dout = _problem(layout, 1, 4, 2, 32, dtype, 0)
        ref_out, ref_lse, ref_grads = _oracle(layout, q, k, v, dout)
        plan = plan_tiles(layout, 1, rank_chunks(64, 1, 0), rank_chunks(64, 1, 0))
        qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))
        out = tile_attention(qg, kg, vg, plan, scale=SCALE, backend=be)
        _, lse = tile_attention(qg, kg, vg, plan, scale=SCALE, backend=be, return_lse=True)
        grads = torch.autograd.grad(out, (qg, kg, vg), dout)
        assert out.dtype == dtype and lse.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
        errs = [_rel(out, ref_out), _rel(lse, ref_lse)] + [_rel(g, r) for g, r in zip(grads, ref_grads)]
        assert max(errs) < tol, (dtype, errs)


def test_output_is_laid_out_for_megatron_without_a_copy():
    layout = SequenceLayout.plain(16)
    q, k, v, _ = _problem(layout, 2, 4, 2, 8, torch.float32, 0)
    plan = plan_tiles(layout, 2, rank_chunks(16, 1, 0), rank_chunks(16, 1, 0))
    out = tile_attention(q, k, v, plan, scale=SCALE, backend=BACKENDS["cpu_flash"])
    assert out.permute(2, 0, 1, 3).is_contiguous()  # [s, b, h, d] memory: the [s, b, h*d] view is free


def test_backend_choice_and_errors():
    cpu = torch.zeros(1, 2, 4, 8)
    assert get_backend("auto", cpu).name == "cpu_flash"
    with pytest.raises(ValueError, match="attention kernel must be one of"):
        get_backend("fast", cpu)
    with pytest.raises(ValueError, match="'torch_flash' runs on cuda tensors"):
        get_backend("torch_flash", cpu)
    with pytest.raises(ValueError, match="'cpu_flash' takes"):
        get_backend("cpu_flash", cpu.to(torch.int64))
    with pytest.raises(ValueError, match="the tile plan is for"):
        layout = SequenceLayout.plain(8)
        plan = plan_tiles(layout, 1, rank_chunks(8, 1, 0), rank_chunks(8, 1, 0))
        tile_attention(cpu, cpu, cpu, plan, scale=1.0, backend=BACKENDS["cpu_flash"])
