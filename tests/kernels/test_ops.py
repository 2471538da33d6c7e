"""The C++ CPU kernels against the torch reference, bit for bit."""

import pytest
import torch

from megatron_longvideo import kernels
from megatron_longvideo.kernels import reference

from .conftest import FLOAT_DTYPES, bitwise_equal, rand

LENGTHS = [1, 7, 13, 127]
HIDDEN = [1, 3, 17, 64]


def _mask(seq_len, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(seq_len, generator=gen) < 0.6


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_shard_and_unshard_match_reference(cpu_kernels, dtype):
    for seq_len in LENGTHS:
        for hidden in HIDDEN:
            x = rand(seq_len, hidden, dtype=dtype, seed=seq_len * 100 + hidden)  # [S, h]
            for cp in range(1, 5):
                shards = []
                for rank in range(cp):
                    pos = kernels.shard_positions(seq_len, cp, rank)
                    got = kernels.shard(x, pos, 0, pad_value=0)
                    assert bitwise_equal(got, reference.shard(x, pos, 0)), (seq_len, hidden, cp, rank)
                    shards.append(got)
                gathered = torch.stack(shards)  # [cp, s_local, h]
                idx = kernels.unshard_index(seq_len, cp)
                got = kernels.unshard(gathered, idx)
                assert bitwise_equal(got, reference.unshard(gathered, idx))
                assert bitwise_equal(got, x)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.int64, torch.bool, torch.uint8])
def test_batched_layouts_match_reference(cpu_kernels, dtype):
    """[b, s, h] (dim=1), [s, b, h] (dim=0), [b, s] token ids, a non-zero pad value, multiple=2."""
    for seq_len in [1, 13, 40]:
        for cp in range(1, 5):
            x = rand(3, seq_len, 5, dtype=torch.float64, seed=seq_len + cp)
            x = (x * 10).nan_to_num(0, 0, 0).to(dtype) if not dtype.is_floating_point else x.to(dtype)
            for dim, tensor in [(1, x), (0, x.transpose(0, 1).contiguous()), (1, x[..., 0])]:
                shards = []
                for rank in range(cp):
                    pos = kernels.shard_positions(seq_len, cp, rank, multiple=2)
                    got = kernels.shard(tensor, pos, dim, pad_value=1)
                    assert bitwise_equal(got, reference.shard(tensor, pos, dim, pad_value=1))
                    shards.append(got)
                idx = kernels.unshard_index(seq_len, cp, multiple=2)
                got = kernels.unshard(shards, idx, dim)  # list input
                assert bitwise_equal(got, reference.unshard(shards, idx, dim))
                assert bitwise_equal(got, tensor)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_merge_matches_reference(cpu_kernels, dtype):
    for seq_len in LENGTHS:
        mask = _mask(seq_len, seq_len)
        num_video = int(mask.sum())
        for hidden in HIDDEN:
            text = rand(seq_len, hidden, dtype=dtype, seed=1)  # [S, h]
            video = rand(num_video, hidden, dtype=dtype, seed=2)  # [V, h]
            merged = text.clone()
            merged[mask] = video  # the full merged sequence, written independently
            for cp in range(1, 5):
                outs = []
                for rank in range(cp):
                    pos = kernels.shard_positions(seq_len, cp, rank)
                    text_shard = reference.shard(text, pos, 0)  # [s_local, h]
                    src = kernels.merge_source_index(mask, cp, rank, num_video=num_video)
                    got = kernels.merge_shard(text_shard, video, src)
                    assert bitwise_equal(got, reference.merge_shard(text_shard, video, src))
                    grad = rand(*got.shape, dtype=dtype, seed=3 + rank)
                    got_t, got_v = kernels.merge_shard_backward(grad, src, num_video)
                    ref_t, ref_v = reference.merge_shard_backward(grad, src, num_video)
                    assert bitwise_equal(got_t, ref_t) and bitwise_equal(got_v, ref_v)
                    outs.append(got)
                restored = kernels.unshard(outs, kernels.unshard_index(seq_len, cp))
                assert bitwise_equal(restored, merged), (seq_len, hidden, cp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_merge_matches_reference(cpu_kernels, dtype):
    gen = torch.Generator().manual_seed(0)
    batch, seq_len, hidden = 3, 29, 17
    mask = torch.rand(batch, seq_len, generator=gen) < 0.5
    seq_lens = torch.tensor([29, 20, 11])
    mask &= torch.arange(seq_len) < seq_lens[:, None]
    num_video = int(mask.sum())
    text = rand(batch, seq_len, hidden, dtype=dtype, seed=4)  # [b, S, h]
    video = rand(num_video, hidden, dtype=dtype, seed=5)  # [V_total, h]
    for cp in range(1, 5):
        for rank in range(cp):
            pos = kernels.shard_positions(seq_len, cp, rank)
            src = kernels.merge_source_index_batched(mask, cp, rank, num_video=num_video,
                                                     seq_lens=seq_lens)  # [b, s_local]
            text_shard = reference.shard(text, pos, 1)  # [b, s_local, h]
            got = kernels.merge_shard(text_shard, video, src)
            assert bitwise_equal(got, reference.merge_shard(text_shard, video, src))
            sbh = kernels.merge_shard(text_shard.transpose(0, 1), video, src.t())  # [s_local, b, h]
            assert bitwise_equal(sbh, got.transpose(0, 1).contiguous())
            grad = rand(*got.shape, dtype=dtype, seed=6)
            for a, b in zip(kernels.merge_shard_backward(grad, src, num_video),
                            reference.merge_shard_backward(grad, src, num_video)):
                assert bitwise_equal(a, b)


def test_bad_inputs(cpu_kernels):
    text, video = torch.zeros(4, 3), torch.zeros(2, 3)
    src = torch.tensor([-1, 0, 1, -2])
    with pytest.raises(ValueError, match="video"):
        kernels.merge_shard(text, torch.zeros(2, 4), src)
    with pytest.raises(ValueError, match="video"):
        kernels.merge_shard(text, video.double(), src)
    with pytest.raises(ValueError, match="src_index"):
        kernels.merge_shard(text, video, src[:3])
    with pytest.raises(RuntimeError, match="src_index"):
        kernels.merge_shard(text, video, torch.tensor([-1, 0, 2, -2]))  # row 2 of 2 rows
    with pytest.raises(RuntimeError, match="twice"):
        kernels.merge_shard_backward(text, torch.tensor([0, 0, 1, -2]), 2)
    with pytest.raises(RuntimeError, match="index"):
        kernels.shard(text, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="dim"):
        kernels.shard(text, torch.tensor([0, 1]), dim=2)
