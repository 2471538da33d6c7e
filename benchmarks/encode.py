"""MR-SP stage 1 benchmark: parallel frame encoding and the embedding cache.

For each frame count it measures, in one run:
  * encode time of one video on world=1 vs an encode group of 2 ranks (CP=2), median of repeats;
  * the vision time of one GRPO-shaped step (G rollout prefills + old-policy + reference + update
    passes = G + 3 uses of the video) without the cache (every use re-encodes) and with it (one
    encode, G + 2 hits).
Ratios are what to read; absolute times depend on the machine. Each rank uses one torch thread.

    python benchmarks/encode.py                  # 64 / 256 / 1024 frames, tiny config
    python benchmarks/encode.py --quick          # smoke size (CI)
    python benchmarks/encode.py --frames 128 --repeats 7 --out results.md
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
from common import emit  # noqa: E402

G = 8


def _worker(rank, world_size, frame_counts, repeats, cache_step, vision):
    init_cpu_dist()
    from megatron_longvideo.models.encode import encode_videos
    from megatron_longvideo.models.video_cache import VideoEmbeddingCache, cache_key, weights_version
    from megatron_longvideo.models.llava_onevision.vision import VisionConfig, build_vision_encoder
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    groups = initialize_parallel(ParallelConfig(context_parallel_size=world_size))
    vcfg = VisionConfig(freeze=True, freeze_projector=True, **vision)
    encoder = build_vision_encoder(vcfg, 64, groups)
    out = {}
    for n in frame_counts:
        size = vcfg.image_size
        frames = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(n))
        times = []
        with torch.no_grad():
            encode_videos(encoder, [frames], groups)  # warm-up
            for _ in range(repeats):
                torch.distributed.barrier()
                t0 = time.perf_counter()
                encode_videos(encoder, [frames], groups)
                times.append(time.perf_counter() - t0)
        out[("encode", n)] = statistics.median(times)
        if cache_step:
            key = [cache_key(f"bench-{n}", {"n": n}, weights_version(encoder))]
            step = {"no_cache": [], "cache": []}
            with torch.no_grad():
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    for _ in range(G + 3):
                        encode_videos(encoder, [frames], groups)
                    step["no_cache"].append(time.perf_counter() - t0)
                    cache = VideoEmbeddingCache()
                    t0 = time.perf_counter()
                    for _ in range(G + 3):
                        encode_videos(encoder, [frames], groups, cache=cache, keys=key)
                    step["cache"].append(time.perf_counter() - t0)
            out[("step_no_cache", n)] = statistics.median(step["no_cache"])
            out[("step_cache", n)] = statistics.median(step["cache"])
    destroy_parallel()
    return out


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smoke size: 16 and 32 frames, 2 repeats")
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--image-size", type=int, default=32, help="frame size (patch 8)")
    parser.add_argument("--width", type=int, default=32, help="ViT hidden size")
    parser.add_argument("--layers", type=int, default=2, help="ViT depth")
    args = parser.parse_args(argv)
    if args.quick:
        args.frames, args.repeats = [16, 32], 2
    vision = dict(image_size=args.image_size, hidden_size=args.width, num_layers=args.layers,
                  ffn_hidden_size=2 * args.width, num_attention_heads=max(1, args.width // 16))
    one = run_ranks(_worker, 1, args.frames, args.repeats, True, vision)[0]
    two = run_ranks(_worker, 2, args.frames, args.repeats, False, vision)
    lines = [
        f"MR-SP stage 1 ({args.image_size} px frames, ViT {args.layers}x{args.width}, projector to 64), torch {torch.__version__}, "
        f"median of {args.repeats}, one thread per rank",
        "",
        "| frames | encode world=1 (s) | encode group 2 (s) | speed-up | G=8 step vision, no cache (s) | with cache (s) | saving |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in args.frames:
        e1 = one[("encode", n)]
        e2 = max(r[("encode", n)] for r in two)
        nc, c = one[("step_no_cache", n)], one[("step_cache", n)]
        lines.append(f"| {n} | {e1:.4f} | {e2:.4f} | {e1 / e2:.2f}x | {nc:.4f} | {c:.4f} | {nc / c:.1f}x |")
    return emit("\n".join(lines), args.out)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
