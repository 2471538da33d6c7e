"""Shard / Unshard / MergeShard autograd Functions: gradcheck in fp64, and exact grads against
autograd through the torch reference."""

import pytest
import torch

from megatron_longvideo import kernels
from megatron_longvideo.kernels import reference

from .conftest import bitwise_equal


def _case(seq_len, cp, hidden=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(seq_len, generator=gen) < 0.5
    text = torch.randn(seq_len, hidden, generator=gen, dtype=torch.float64)  # [S, h]
    video = torch.randn(int(mask.sum()), hidden, generator=gen, dtype=torch.float64)  # [V, h]
    return mask, text, video


@pytest.mark.parametrize("cp", [1, 2, 3])
def test_gradcheck(cp):
    seq_len = 7
    mask, text, video = _case(seq_len, cp)
    for rank in range(cp):
        pos = kernels.shard_positions(seq_len, cp, rank)
        src = kernels.merge_source_index(mask, cp, rank)
        text_shard = reference.shard(text, pos, 0).requires_grad_()
        vid = video.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda t, v: kernels.merge_shard(t, v, src), (text_shard, vid))
        x = text.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda t: kernels.shard(t, pos, 0, 0.5), (x,))
    s_local = kernels.local_length(seq_len, cp)
    gathered = torch.randn(cp, 2, s_local, 3, dtype=torch.float64, requires_grad=True)
    idx = kernels.unshard_index(seq_len, cp)
    assert torch.autograd.gradcheck(lambda g: kernels.unshard(g, idx, 1), (gathered,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grads_equal_reference_autograd(dtype):
    """The whole CP prefill data path: shard text, merge video, unshard per-token outputs."""
    seq_len, hidden = 13, 17
    for cp in range(1, 5):
        mask, text, video = _case(seq_len, cp, hidden, seed=cp)
        weight = torch.randn(seq_len, hidden, dtype=torch.float64).to(dtype)
        grads = []
        for impl in (kernels, reference):
            t = text.to(dtype).requires_grad_()
            v = video.to(dtype).requires_grad_()
            outs = []
            for rank in range(cp):
                pos = kernels.shard_positions(seq_len, cp, rank)
                src = kernels.merge_source_index(mask, cp, rank)
                outs.append(impl.merge_shard(impl.shard(t, pos, 0), v, src))  # [s_local, h]
            full = impl.unshard(torch.stack(outs), kernels.unshard_index(seq_len, cp))  # [S, h]
            (full * weight).sum().backward()
            grads.append((full.detach(), t.grad, v.grad))
        for got, want in zip(*grads):
            assert bitwise_equal(got, want), cp
        # Text rows replaced by video get no grad; video rows get the weight at their position.
        assert bool((grads[0][1][mask] == 0).all())
        assert bitwise_equal(grads[0][2], weight[mask])
