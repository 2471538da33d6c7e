"""Layout validation: impossible layouts are rejected with the field named (no processes needed)."""

import pytest

from megatron_longvideo.parallel.groups import ParallelConfig, single_rank_groups


@pytest.mark.parametrize("kwargs, message", [
    ({"tensor_parallel_size": 0}, "tensor_parallel_size must be a positive integer"),
    ({"cp_comm_type": "ring"}, "cp_comm_type must be one of"),
    ({"encode_group": "dp"}, "encode_group must be one of"),
    ({"sequence_parallel": True}, "sequence_parallel needs tensor_parallel_size > 1"),
])
def test_bad_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**kwargs)


def test_world_size_and_heads_must_divide():
    cfg = ParallelConfig(tensor_parallel_size=2, context_parallel_size=2, cp_comm_type="a2a")
    assert cfg.data_parallel_size(8) == 2
    with pytest.raises(ValueError, match="world size 6 is not divisible"):
        cfg.data_parallel_size(6)
    with pytest.raises(ValueError, match="num_attention_heads=6 is not divisible by tensor_parallel_size=4"):
        ParallelConfig(tensor_parallel_size=4).check_model(num_attention_heads=6)
    with pytest.raises(ValueError, match="num_query_groups=2 is not divisible by tensor_parallel_size=4"):
        ParallelConfig(tensor_parallel_size=4).check_model(num_attention_heads=8, num_query_groups=2)
    with pytest.raises(ValueError, match="Ulysses"):
        cfg.check_model(num_attention_heads=6)  # 3 heads per TP rank over CP=2
    cfg.check_model(num_attention_heads=8, num_query_groups=2)


def test_single_rank_groups():
    groups = single_rank_groups()
    assert (groups.tp_size, groups.cp_size, groups.dp_size, groups.encode_size) == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="every parallel size equal to 1"):
        single_rank_groups(ParallelConfig(tensor_parallel_size=2))
