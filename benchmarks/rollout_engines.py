"""Rollout engines on the CPU: the ``hf`` engine (transformers, its own weight copy) vs the ``megatron``
engine (generation on the policy model itself, no weight copy).

For each model size and response length it times, at world=1 with one torch thread (one rank of the CPU
demo), the generation of G=8 seeded responses (temperature 1) to each of a few prompts of the CPU demo's
length (8 frames of 32 px video tokens + 16 text tokens), after a warm-up call: median of repeats, the
two engines' calls alternating. Both engines draw the same tokens (asserted). Also timed: the ``hf``
engine's weight sync per step (full-state gather + ``sync_weights``), which the ``megatron`` engine does
not need. Sizes: the CPU demo's LLM
(``examples/scripts/demo_cpu.sh`` with ``training/args.py``'s defaults: 2 layers, width 64, 4 heads,
2 query groups, FFN 256, vocabulary 512) and a larger one (8 layers, width 512, 8 heads, 4 groups,
FFN 2048, vocabulary 8192). Ratios are what to read; absolute times depend on the machine.
Leaves out: TP > 1 (the megatron engine's all-reduces), GPUs, and the video tower (both engines take
the same merged prompt embeddings).

    python benchmarks/rollout_engines.py            # both sizes, 16 and 64 new tokens, 5 repeats
    python benchmarks/rollout_engines.py --quick    # smoke size (CI)
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
SIZES = {
    "demo": dict(vocab_size=512, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=256),
    "larger": dict(vocab_size=8192, hidden_size=512, num_layers=8, num_attention_heads=8, num_query_groups=4,
                   ffn_hidden_size=2048),
}


def _prompt_length() -> int:
    from megatron_longvideo.models.llava_onevision.vision import VisionConfig

    return VisionConfig(image_size=32, patch_size=8).num_video_tokens(8) + 16  # the demo's --num-frames 8


def _timed(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Median seconds and the result of each of ``fns``, after a warm-up call of each; the calls
    alternate, so a change of load during the run reaches every engine alike."""
    out = {name: fn() for name, fn in fns.items()}  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}, out


def _worker(rank, world_size, sizes, new_tokens, num_prompts, repeats):
    init_cpu_dist()
    from megatron_longvideo.checkpoint.full_state import gather_full_state
    from megatron_longvideo.models.llm import LLMConfig, build_llm
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.rl.engines import SamplingConfig, build_engine

    groups = initialize_parallel(ParallelConfig())
    length = _prompt_length()
    out = {}
    for size in sizes:
        cfg = LLMConfig(init_std=0.05, **SIZES[size])
        torch.manual_seed(0)
        policy = build_llm(cfg, groups)
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randn(length + 3 * i, cfg.hidden_size, generator=g) for i in range(num_prompts)]
        hf = build_engine("hf", cfg)
        ours = build_engine("megatron", cfg, policy=policy, groups=groups)
        sync = _timed({"sync": lambda: hf.sync_weights(gather_full_state(policy, groups))}, repeats)[0]["sync"]
        for n in new_tokens:
            sampling = SamplingConfig(temperature=1.0, max_new_tokens=n, n=G, seed=3)
            times, tokens = _timed({"hf": lambda: hf.generate(prompts, sampling),
                                    "megatron": lambda: ours.generate(prompts, sampling)}, repeats)
            assert tokens["hf"] == tokens["megatron"], f"{size}, {n} new tokens: the engines drew different tokens"
            generated = sum(len(c.token_ids) for group in tokens["megatron"] for c in group)
            out[(size, n)] = dict(**times, sync=sync, tokens=generated)
    destroy_parallel()
    return out


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[16, 64], help="max_new_tokens per response")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smoke size: the demo model, 4 new tokens, 2 prompts, 1 repeat")
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.new_tokens, args.prompts, args.repeats = ["demo"], [4], 2, 1
    res = run_ranks(_worker, 1, args.sizes, args.new_tokens, args.prompts, args.repeats, timeout=3600)[0]
    lines = [f"Rollout engines, world=1, one torch thread, torch {torch.__version__}: {args.prompts} prompts of "
             f"{_prompt_length()}+ tokens, G={G} seeded responses each (temperature 1, same tokens from both engines), "
             f"median of {args.repeats} after a warm-up", "",
             "| model | new tokens | tokens drawn | hf engine (s) | megatron engine (s) | megatron speed / hf | "
             "hf weight sync per step (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for size in args.sizes:
        for n in args.new_tokens:
            r = res[(size, n)]
            lines.append(f"| {size} | {n} | {r['tokens']} | {r['hf']:.3f} | {r['megatron']:.3f} | "
                         f"{r['hf'] / r['megatron']:.2f}x | {r['sync']:.4f} |")
    return emit("\n".join(lines), args.out)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
