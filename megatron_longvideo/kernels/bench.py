"""Throughput of the shard / unshard / merge kernels against the torch composite and a plain copy.

``bench_kernels(device=...)`` returns a flat dict of GB/s (bytes read + written per second, median of
``num_runs``): ``"<op>.kernel"`` (``kernels.ops``, i.e. whatever ``kernels.backend(device)`` runs,
writing into a reused output), ``"<op>.kernel_alloc"`` (the same with a fresh output per call, as the
autograd ops do), ``"<op>.torch"`` (``kernels.reference``) and ``"<op>.copy"`` (``Tensor.copy_`` of the
output's bytes between two reused buffers: the bandwidth ceiling). Ops: ``shard``, ``unshard``,
``merge``, ``merge_backward``. On CPU a fresh output of tens of MB is page-faulted on first touch
(glibc hands large blocks back to the OS), which can cost more than the copy itself; CUDA's caching
allocator makes ``kernel`` and ``kernel_alloc`` nearly equal.
Called by ``benchmarks/prefill.py``; works on CPU and CUDA.

    python -m megatron_longvideo.kernels.bench            # CPU, or CUDA when available
"""

import statistics
import time

import torch

from . import ops, reference
from .index import local_length, merge_source_index, shard_positions, unshard_index


def _timer(device):
    if device.type != "cuda":
        def run(fn):
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        return run

    def run_cuda(fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    return run_cuda


def _median_gbps(fn, num_bytes, device, num_runs, warmup):
    run = _timer(device)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = statistics.median(run(fn) for _ in range(num_runs))
    return num_bytes / max(seconds, 1e-12) / 1e9


def bench_kernels(device=None, seq_len=32768, hidden=3584, cp_size=4, cp_rank=0,
                  video_fraction=0.9, dtype=torch.bfloat16, num_runs=20, warmup=3, seed=0):
    """GB/s of each op on one CP rank's shard of a ``[seq_len, hidden]`` merged sequence.

    Bytes counted per op: every output byte written plus the bytes read to make it (padding rows count
    as written only). The copy baseline moves ``out.nbytes`` from one buffer to another.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(seq_len, generator=gen) < video_fraction  # [S]
    num_video = int(mask.sum())
    s_local = local_length(seq_len, cp_size)
    text = torch.randn(seq_len, hidden, generator=gen).to(device, dtype)  # [S, h]
    video = torch.randn(num_video, hidden, generator=gen).to(device, dtype)  # [V, h]
    pos = shard_positions(seq_len, cp_size, cp_rank, device=device)  # [s_local]
    src = merge_source_index(mask.to(device), cp_size, cp_rank)  # [s_local]
    text_shard = reference.shard(text, pos, 0)  # [s_local, h]
    gathered = torch.randn(cp_size, s_local, hidden, generator=gen).to(device, dtype)
    idx = unshard_index(seq_len, cp_size, device=device)  # [S]
    grad = torch.randn(s_local, hidden, generator=gen).to(device, dtype)  # [s_local, h]

    row = hidden * text.element_size()
    valid = int((pos >= 0).sum())
    real = int((src != -2).sum())  # rows read by the merge (padding is only written)
    out_shard = torch.empty_like(text_shard)  # [s_local, h]
    out_full = torch.empty_like(text)  # [S, h]
    out_video = torch.empty_like(video)  # [V, h]
    cases = {  # name: (kernel(out or None), torch composite, bytes moved, output bytes)
        "shard": (lambda o: ops._shard(text, pos, 0, 0, out_shard if o else None),
                  lambda: reference.shard(text, pos, 0), (s_local + valid) * row, s_local * row),
        "unshard": (lambda o: ops._unshard(gathered, idx, 0, out_full if o else None),
                    lambda: reference.unshard(gathered, idx), 2 * seq_len * row, seq_len * row),
        "merge": (lambda o: ops._merge(text_shard, video, src, out_shard if o else None),
                  lambda: reference.merge_shard(text_shard, video, src),
                  (s_local + real) * row, s_local * row),
        "merge_backward": (
            lambda o: ops.merge_shard_backward(grad, src, num_video,
                                               (out_shard, out_video) if o else None),
            lambda: reference.merge_shard_backward(grad, src, num_video),
            (2 * s_local + num_video) * row, (s_local + num_video) * row),
    }
    results = {}
    for name, (kernel, composite, num_bytes, out_bytes) in cases.items():
        src_buf = torch.empty(out_bytes, dtype=torch.uint8, device=device)
        dst_buf = torch.empty_like(src_buf)
        results[f"{name}.kernel"] = _median_gbps(lambda: kernel(True), num_bytes, device, num_runs,
                                                 warmup)
        results[f"{name}.kernel_alloc"] = _median_gbps(lambda: kernel(False), num_bytes, device,
                                                       num_runs, warmup)
        results[f"{name}.torch"] = _median_gbps(composite, num_bytes, device, num_runs, warmup)
        results[f"{name}.copy"] = _median_gbps(lambda: dst_buf.copy_(src_buf), 2 * out_bytes,
                                               device, num_runs, warmup)
    return results


if __name__ == "__main__":
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"backend: {ops.backend(dev)}")
    for key, value in bench_kernels(dev).items():
        print(f"{key:24s} {value:8.2f} GB/s")
