"""Rollout weight sync at TP=2: today's full gather against the bucketed stream, time and peak memory.

Paths, each from a TP=2 Qwen2-style LLM into the library's ``HFEngine`` (built in the model's dtype)
on rank 0, as the GRPO trainer does (only the replica's first rank holds an engine):

  full         ``gather_full_state`` (fp32 clones of every full tensor, on every rank), then
               ``engine.sync_weights(dict)`` on rank 0; the other rank holds the dict until the end
  bucket <N>   ``iter_full_state_items(bucket_bytes=N MB)`` (one all-gather per bucket, in the training
               dtype) streamed into ``engine.sync_weights`` on rank 0; the other rank drains it

Measured per sync: wall time (from the first gather to the last copy, the slower rank) and each rank's
peak extra memory (RSS growth over the sync's start, sampled every 2 ms by a thread; on CUDA
``max_memory_allocated`` growth). The policy and the engine are built before. Each dtype runs in
fresh processes; after one warm-up sync per path the paths take turns for ``--repeats`` rounds and
medians are reported. glibc's malloc is pinned to mmap big blocks (``MALLOC_MMAP_THRESHOLD_``) so that
freed tensors leave the RSS and one path's leftovers do not hide the next one's growth.

    python benchmarks/weight_sync.py --out /tmp/weight_sync.md   # hidden 1024, 8 layers, a few minutes on 2 CPU cores
                                                                 # (docs/results/weight_sync_cpu.md: its table, with notes)
    python benchmarks/weight_sync.py --quick                     # smoke size (CI)

Left out: vLLM (its own loader and chunking come after our stream) and pipeline parallelism (refused).
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

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(path, model, groups, engine):
    """One sync by ``path`` ("full" or a bucket size in bytes); returns (seconds, peak extra MB)."""
    import torch.distributed as dist

    from megatron_longvideo.checkpoint.full_state import gather_full_state, iter_full_state_items

    dist.barrier()
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        if path == "full":
            weights = gather_full_state(model, groups)
        else:
            weights = iter_full_state_items(model, groups, bucket_bytes=path)
        if engine is not None:
            engine.sync_weights(weights)
        else:
            for _ in weights:  # every TP rank takes part in the gathers
                pass
        dist.barrier()
        seconds = time.perf_counter() - t0
        del weights
    return seconds, mem.peak_mb


def _worker(rank, world_size, llm_kwargs, dtype_name, paths, repeats):
    init_cpu_dist()
    from megatron_longvideo.models.llm import LLMConfig, build_llm
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.rl.engines.hf_engine import HFEngine

    dtype = DTYPES[dtype_name]
    groups = initialize_parallel(ParallelConfig(tensor_parallel_size=world_size), seed=0)
    cfg = LLMConfig(**llm_kwargs)
    torch.manual_seed(0)
    model = build_llm(cfg, groups, params_dtype=dtype)
    engine = HFEngine(cfg, dtype=dtype) if rank == 0 else None
    for path in paths:  # warm-up
        _sync(path, model, groups, engine)
    runs = {path: [] for path in paths}
    for _ in range(repeats):
        for path in paths:
            runs[path].append(_sync(path, model, groups, engine))
    tp = groups.size(groups.tp)
    numels = [p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1) for p in model.parameters()]
    sizes = {"shard_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
             "full_mb": sum(numels) * dtype.itemsize / 2**20, "full_fp32_mb": sum(numels) * 4 / 2**20,
             "largest_mb": max(numels) * dtype.itemsize / 2**20}
    destroy_parallel()
    return runs, sizes


def _label(path) -> str:
    return "full gather (today)" if path == "full" else f"bucket {path / 2**20:g} MB"


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--buckets-mb", type=float, nargs="+", default=[16, 256])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--machine", default="CPU, 2 cores, gloo, torch " + torch.__version__.split("+")[0])
    parser.add_argument("--quick", action="store_true", help="smoke size: hidden 128, 2 layers, buckets of 64 kB and 1 MB")
    parser.add_argument("--out", help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.vocab, args.buckets_mb, args.repeats = 128, 2, 1024, [1 / 16, 1], 1
    heads = max(2, args.hidden // 64)
    llm_kwargs = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_attention_heads=heads,
                      num_query_groups=2, ffn_hidden_size=args.hidden * 11 // 4 // 64 * 64)
    paths = ["full"] + [int(mb * 2**20) for mb in args.buckets_mb]
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))  # read by the spawned ranks' malloc
    results = {d: run_ranks(_worker, 2, llm_kwargs, d, paths, args.repeats, timeout=3600) for d in args.dtypes}

    from megatron_longvideo.models.llm import LLMConfig

    cfg = LLMConfig(**llm_kwargs)
    lines = [f"## Weight sync at TP=2 into HFEngine on rank 0 ({args.machine}; median of {args.repeats} after a warm-up)", "",
             f"LLM: hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_attention_heads} heads ({cfg.num_query_groups} "
             f"KV groups), ffn {cfg.ffn_hidden_size}, vocab {cfg.vocab_size}, untied embeddings.", "",
             "| dtype | path | sync (s) | vs full | peak extra, engine rank (MB) | peak extra, other rank (MB) | vs full (max) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    notes = []
    for d, ranks in results.items():
        (runs0, sizes0), (runs1, _) = ranks
        row = {}
        for path in paths:
            seconds = statistics.median(max(a[0], b[0]) for a, b in zip(runs0[path], runs1[path]))
            mem0 = statistics.median(a[1] for a in runs0[path])
            mem1 = statistics.median(b[1] for b in runs1[path])
            row[path] = (seconds, mem0, mem1)
        base_s, base0, base1 = row["full"]
        for path in paths:
            s, m0, m1 = row[path]
            lines.append(f"| {d} | {_label(path)} | {s:.3f} | {s / base_s:.2f}x | {m0:.1f} | {m1:.1f} | "
                         f"{max(m0, m1) / max(base0, base1, 1e-9):.2f} |")
        notes.append(f"{d}: a rank's shard {sizes0['shard_mb']:.0f} MB; the full model {sizes0['full_mb']:.0f} MB in {d}, "
                     f"{sizes0['full_fp32_mb']:.0f} MB in fp32 (what the full gather clones on every rank); the largest "
                     f"tensor (the embedding, the output layer) {sizes0['largest_mb']:.0f} MB, a bucket of its own")
    lines += [""] + [f"- {n}" for n in notes]
    return emit("\n".join(lines), args.out)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
