import pytest
import torch

from megatron_longvideo.kernels import (
    all_shard_positions,
    inverse_index,
    local_length,
    merge_source_index,
    merge_source_index_batched,
    padded_length,
    shard_positions,
    unshard_index,
)

LENGTHS = [1, 2, 7, 8, 13, 16, 127, 128]


def test_padded_length_by_hand():
    assert padded_length(8, 2) == 8
    assert padded_length(9, 2) == 12
    assert padded_length(1, 4) == 8
    assert padded_length(13, 3, multiple=2) == 24
    assert padded_length(5, 1) == 6
    assert local_length(13, 3, multiple=2) == 8


def test_zigzag_order_by_hand():
    assert shard_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert shard_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert shard_positions(7, 2, 0).tolist() == [0, 1, 6, -1]
    assert shard_positions(7, 2, 1).tolist() == [2, 3, 4, 5]
    assert shard_positions(5, 2, 0, multiple=2).tolist() == [0, 1, -1, -1]
    assert shard_positions(5, 2, 1, multiple=2).tolist() == [2, 3, 4, -1]
    assert shard_positions(12, 3, 1).tolist() == [2, 3, 8, 9]
    assert shard_positions(5, 1, 0).tolist() == [0, 1, 2, 3, 4, -1]
    assert unshard_index(8, 2).tolist() == [0, 1, 4, 5, 6, 7, 2, 3]
    assert unshard_index(7, 2).tolist() == [0, 1, 4, 5, 6, 7, 2]


@pytest.mark.parametrize("multiple", [1, 2, 3])
def test_positions_cover_sequence(multiple):
    for seq_len in LENGTHS:
        for cp in range(1, 5):
            padded = padded_length(seq_len, cp, multiple)
            assert padded % (2 * cp * multiple) == 0 and padded - seq_len < 2 * cp * multiple
            per_rank = [shard_positions(seq_len, cp, r, multiple) for r in range(cp)]
            assert all(p.numel() == padded // cp for p in per_rank)
            flat = torch.cat(per_rank)
            assert torch.equal(flat, all_shard_positions(seq_len, cp, multiple))
            assert torch.equal(flat[flat >= 0].sort().values, torch.arange(seq_len))
            assert int((flat == -1).sum()) == padded - seq_len
            assert bool((flat >= -1).all())
            idx = unshard_index(seq_len, cp, multiple)
            assert torch.equal(flat[idx], torch.arange(seq_len))
            assert torch.equal(inverse_index(flat, seq_len), idx)


def test_merge_source_index_by_hand():
    mask = torch.tensor([0, 0, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    assert merge_source_index(mask, 2, 0).tolist() == [-1, -1, -1, -1]
    assert merge_source_index(mask, 2, 1).tolist() == [0, 1, 2, 3]
    mask = torch.tensor([0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    assert merge_source_index(mask, 2, 0, num_video=3).tolist() == [-1, 0, -1, -2]
    assert merge_source_index(mask, 2, 1).tolist() == [1, -1, -1, 2]
    assert merge_source_index(mask, 1, 0).tolist() == [-1, 0, 1, -1, -1, 2, -1, -2]


def test_merge_source_index_batched_by_hand():
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 1, 0]], dtype=torch.bool)
    out = merge_source_index_batched(mask, 1, 0, num_video=4)
    assert out.tolist() == [[-1, 0, 1, -1], [2, -1, 3, -1]]
    out = merge_source_index_batched(mask, 1, 0, seq_lens=[4, 3])
    assert out.tolist() == [[-1, 0, 1, -1], [2, -1, 3, -2]]
    out = merge_source_index_batched(mask, 2, 1)  # chunks of 1: rank 1 holds positions [1, 2]
    assert out.tolist() == [[0, 1], [-1, 3]]
    out = merge_source_index_batched(mask, 2, 0, seq_lens=[4, 3])  # positions [0, 3]
    assert out.tolist() == [[-1, -1], [2, -2]]


def test_batched_matches_per_sample():
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 13, generator=gen) < 0.5
    counts = mask.sum(1).tolist()
    for cp in range(1, 5):
        for rank in range(cp):
            out = merge_source_index_batched(mask, cp, rank)
            offset = 0
            for i in range(3):
                single = merge_source_index(mask[i], cp, rank)
                assert torch.equal(out[i], torch.where(single >= 0, single + offset, single))
                offset += counts[i]


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="cp_rank"):
        shard_positions(8, 2, 2)
    with pytest.raises(ValueError, match="cp_rank"):
        shard_positions(8, 2, -1)
    with pytest.raises(ValueError, match="cp_size"):
        padded_length(8, 0)
    with pytest.raises(ValueError, match="seq_len"):
        unshard_index(0, 2)
    with pytest.raises(ValueError, match="multiple"):
        padded_length(8, 2, multiple=0)
    mask = torch.tensor([0, 1, 1, 0], dtype=torch.bool)
    with pytest.raises(ValueError, match="num_video"):
        merge_source_index(mask, 2, 0, num_video=3)
    with pytest.raises(ValueError, match="video_mask"):
        merge_source_index(mask.long(), 2, 0)
    with pytest.raises(ValueError, match="seq_lens"):
        merge_source_index_batched(mask[None], 1, 0, seq_lens=[2])
