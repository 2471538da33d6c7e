"""MR-SP stage 2 benchmark: shared-prefix packing, the sharding kernels, and per-rank prefill memory.

Measured in one run (ratios are what to read; absolute numbers depend on the machine):
  1. shared-prefix packing vs G separate sequences, for the log-prob pass (forward only) and for
     forward + backward, on the tiny LLM scaled to a prefix of 4,096 tokens and G=8 responses of 256;
  2. the shard / unshard / merge kernels vs the torch composite vs a plain memory copy (GB/s);
  3. per-rank peak memory (growth during one forward + backward of the packed group, after a warm-up
     pass: RSS sampled by a thread on CPU, max_memory_allocated on CUDA) at CP=1, 2 and 4.
Each rank runs with one torch thread.

    python benchmarks/prefill.py            # full size (a few minutes on 2 CPU cores)
    python benchmarks/prefill.py --quick    # smoke size (CI)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from megatron_longvideo.parallel.spawn import init_cpu_dist, run_ranks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PeakMemory, emit  # noqa: E402


def _setup(cp, prefix_len, response_len, g, pack, micro):
    from megatron_longvideo.models.llm import LLMConfig, build_llm
    from megatron_longvideo.parallel.groups import ParallelConfig, initialize_parallel
    from megatron_longvideo.rl.packing import build_prefill_batch
    from megatron_longvideo.training.engine import wrap_ddp

    groups = initialize_parallel(ParallelConfig(context_parallel_size=cp), seed=0)
    torch.manual_seed(0)
    model = wrap_ddp(build_llm(LLMConfig.tiny(vocab_size=512), groups), groups)
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(1, 512, (prefix_len,), generator=gen)
    responses = [torch.randint(1, 512, (response_len,), generator=gen) for _ in range(g)]
    if pack:
        batches = [build_prefill_batch([prefix], [responses], pack=True, pad_id=0)]
    else:  # separate sequences, `micro` rows per micro-batch
        batches = [build_prefill_batch([prefix], [responses[i : i + micro]], pack=False, pad_id=0) for i in range(0, g, micro)]
    return groups, model, batches


def _pass(groups, model, batches, backward):
    from megatron_longvideo.models.prefill import prefill_step
    from megatron_longvideo.training.engine import forward_backward

    def loss_fn(logp, entropy, plan):
        return -logp.sum(), torch.tensor(plan.owned.numel(), dtype=torch.int), {}

    model.zero_grad_buffer()
    for batch in batches:
        step = prefill_step(groups, batch, loss_fn=loss_fn if backward else None)
        forward_backward(model, step, [None], seq_length=batch.input_ids.shape[1],
                         micro_batch_size=batch.input_ids.shape[0], forward_only=not backward)


def _timing_worker(rank, world_size, prefix_len, response_len, g, repeats):
    init_cpu_dist()
    from megatron_longvideo.parallel.groups import destroy_parallel

    out = {}
    for pack in (False, True):
        groups, model, batches = _setup(1, prefix_len, response_len, g, pack, micro=1)
        for backward in (False, True):
            _pass(groups, model, batches, backward)  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                if backward:
                    _pass(groups, model, batches, True)
                else:
                    with torch.no_grad():
                        _pass(groups, model, batches, False)
                times.append(time.perf_counter() - t0)
            out[(pack, backward)] = statistics.median(times)
        destroy_parallel()
    return out


def _memory_worker(rank, world_size, prefix_len, response_len, g):
    init_cpu_dist()
    from megatron_longvideo.parallel.groups import destroy_parallel

    groups, model, batches = _setup(world_size, prefix_len, response_len, g, True, micro=1)
    _pass(groups, model, batches, True)  # warm-up: buffers and allocator pools exist before measuring
    with PeakMemory() as mem:
        _pass(groups, model, batches, True)
    destroy_parallel()
    return mem.peak_mb


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", type=int, default=4096)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke size: prefix 256, responses of 32, G=4")
    parser.add_argument("--out", help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.prefix, args.response, args.group_size, args.repeats = 256, 32, 4, 1
    p, r, g = args.prefix, args.response, args.group_size
    timing = run_ranks(_timing_worker, 1, p, r, g, args.repeats, timeout=1800)[0]
    lines = [f"## Shared-prefix packing (tiny LLM, prefix {p}, G={g} responses of {r}, CP=1, median of {args.repeats})", "",
             "| pass | separate (s) | packed (s) | speed-up |", "|---|---:|---:|---:|"]
    for backward, name in ((False, "log-prob pass (forward)"), (True, "forward + backward")):
        sep, packed = timing[(False, backward)], timing[(True, backward)]
        lines.append(f"| {name} | {sep:.3f} | {packed:.3f} | {sep / packed:.2f}x |")

    from megatron_longvideo import kernels
    from megatron_longvideo.kernels.bench import bench_kernels

    seq = 4096 if args.quick else 32768
    gbps = bench_kernels(device="cpu", seq_len=seq, hidden=256 if args.quick else 3584, cp_size=4,
                         num_runs=3 if args.quick else 10)
    lines += ["", f"## Kernels ({kernels.backend('cpu')} backend, CPU, shard of a {seq}-token sequence at CP=4, GB/s)", "",
              "| op | kernel | kernel (new output) | torch composite | copy | kernel / torch |", "|---|---:|---:|---:|---:|---:|"]
    for op in ("shard", "unshard", "merge", "merge_backward"):
        k, ka, t, c = (gbps[f"{op}.{x}"] for x in ("kernel", "kernel_alloc", "torch", "copy"))
        lines.append(f"| {op} | {k:.1f} | {ka:.1f} | {t:.1f} | {c:.1f} | {k / t:.1f}x |")

    lines += ["", "## Per-rank peak memory of the packed prefill (forward + backward, growth in MB)", "",
              "| CP | max over ranks | vs CP=1 |", "|---:|---:|---:|"]
    base = None
    for cp in (1, 2, 4):
        peak = max(run_ranks(_memory_worker, cp, p, r, g, timeout=1800))
        base = base or peak
        lines.append(f"| {cp} | {peak:.0f} | {peak / base:.2f} |")
    return emit("\n".join(lines), args.out)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
