import torch

from megatron_longvideo.kernels.bench import bench_kernels


def test_bench_returns_positive_gbps():
    result = bench_kernels("cpu", seq_len=301, hidden=17, cp_size=3, cp_rank=1,
                           dtype=torch.float32, num_runs=3, warmup=1)
    ops = ["shard", "unshard", "merge", "merge_backward"]
    assert set(result) == {f"{op}.{impl}" for op in ops for impl in ("kernel", "kernel_alloc", "torch", "copy")}
    assert all(isinstance(v, float) and v > 0 for v in result.values())
