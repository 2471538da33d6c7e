"""The one-command GPU check: what a lent GPU must confirm, in one report, in under 8 minutes.

1. **Environment**: torch, CUDA, the device, megatron-core, transformers, TransformerEngine / flash-attn.
2. **Attention kernels**: every tile kernel the device runs (torch's flash, memory-efficient and cuDNN
   SDPA ops, FlexAttention, flash-attn when installed) against the fp64 dense oracle on a packed layout
   with GQA and a one-token response: output, lse and dq/dk/dv (``megatron_longvideo.attention.check``).
3. **CUDA kernels**: the shard / unshard / merge kernels against the torch composite and a
   device-to-device copy of the same bytes (``megatron_longvideo.kernels.bench``).
4. **A GRPO step at world=1 in bf16** of a Qwen2-0.5B-shaped LLM (24 layers x 896, 14 heads, 2 KV
   heads, tied 151,936-token vocabulary) with a frozen ViT-B tower (224 px, patch 14, 64 tokens per
   frame): 64 frames, G=4 responses of 64 tokens, shared-prefix packing, once with the ``megatron``
   engine (the policy itself, the default) and once with the ``hf`` engine in bf16 on the GPU; phases
   timed (medians of 2 steps after a warm-up) and the peak memory.

Every section runs even when an earlier one fails; failures are written into the report and the exit
status is 1. ``--quick`` is the CPU smoke size the test suite runs (tiny model, CPU kernels).

    python benchmarks/gpu_check.py --out docs/results/gpu_check.md      # on one GPU
    python benchmarks/gpu_check.py --quick --out /tmp/gpu_check.md      # CPU smoke (CI)

On the lent machine megatron-core is not installed: bring its wheel (``pip download megatron-core==0.16.1
--no-deps -d wheels``) and ``pip install --no-deps wheels/*.whl`` there first (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _versions() -> list[str]:
    lines = [f"- torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if torch.version.cuda else "")]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"- device: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability "
                     f"{props.major}.{props.minor}")
    else:
        lines.append("- device: CPU only")
    for name in ("megatron.core", "transformers", "transformer_engine", "flash_attn"):
        try:
            module = __import__(name, fromlist=["__version__"])
            lines.append(f"- {name} {getattr(module, '__version__', '?')}")
        except ImportError:
            lines.append(f"- {name}: not installed")
    return lines


def check_attention(device: str) -> tuple[list[str], bool]:
    from megatron_longvideo.attention.backends import BACKENDS
    from megatron_longvideo.attention.check import TOLERANCE, check_backend

    lines = ["| kernel | dtype | max relative error (out, lse, dq, dk, dv) | tolerance | result |", "|---|---|---:|---:|---|"]
    failed = False
    for name, backend in BACKENDS.items():
        if name in ("dense", "dense_recompute"):
            continue
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            probe = torch.empty(1, 1, 1, 64, dtype=dtype, device=device)
            if backend.unsupported(probe):
                continue
            try:
                err = check_backend(name, dtype, device, seq_len=256 if device == "cpu" else 1024)
                ok = err <= TOLERANCE[dtype]
                lines.append(f"| {name} | {str(dtype)[6:]} | {err:.2e} | {TOLERANCE[dtype]:.0e} | {'ok' if ok else 'FAIL'} |")
            except Exception as e:  # noqa: BLE001 - every kernel is reported
                ok = False
                lines.append(f"| {name} | {str(dtype)[6:]} | - | - | ERROR {type(e).__name__}: {str(e)[:120]} |")
            failed |= not ok
    return lines, failed


def check_kernels(device: str, quick: bool) -> tuple[list[str], bool]:
    from megatron_longvideo.kernels import backend
    from megatron_longvideo.kernels.bench import bench_kernels

    size = dict(seq_len=4096, hidden=256, cp_size=2) if quick else dict(seq_len=131072, hidden=3584, cp_size=8)
    gbps = bench_kernels(device=torch.device(device), **size, num_runs=3 if quick else 10)
    lines = [f"Backend: `{backend(torch.device(device))}`; a {size['seq_len']:,}-token, {size['hidden']:,}-wide bf16 sequence "
             f"at CP={size['cp_size']} (GB/s, median):", "",
             "| op | kernel | kernel (new output) | torch composite | copy | kernel / copy |", "|---|---:|---:|---:|---:|---:|"]
    for op in ("shard", "unshard", "merge", "merge_backward"):
        k, a, t, c = (gbps[f"{op}.{x}"] for x in ("kernel", "kernel_alloc", "torch", "copy"))
        lines.append(f"| {op} | {k:.1f} | {a:.1f} | {t:.1f} | {c:.1f} | {k / c:.2f} |")
    return lines, False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_grpo_step(quick: bool) -> tuple[list[str], bool]:
    import torch.distributed as dist

    from grpo_step import _trainer_class
    from megatron_longvideo.data.tokenizer import load_tokenizer
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.models.video_cache import VideoEmbeddingCache
    from megatron_longvideo.models.llava_onevision.vision import VisionConfig
    from megatron_longvideo.models.llava_onevision.model import VLMConfig, build_vlm
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.platform import enable_cpu_mode
    from megatron_longvideo.rl.engines import build_engine
    from megatron_longvideo.rl.engines.base import SamplingConfig
    from megatron_longvideo.rl.losses import GRPOLossConfig
    from megatron_longvideo.rl.rewards import GroundTruth
    from megatron_longvideo.rl.rollout import RLPrompt
    from megatron_longvideo.rl.trainer import GRPOConfig
    from megatron_longvideo.training.engine import OptimConfig, build_optimizer, mixed_precision, wrap_ddp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    enable_cpu_mode()  # a no-op where CUDA exists
    groups = initialize_parallel(ParallelConfig(), seed=1)
    tok = load_tokenizer("bytes")
    if quick:
        llm = LLMConfig.tiny(vocab_size=320)
        vision = VisionConfig(freeze=True, freeze_projector=True)
        frames, group_size, response_len, dtype = 4, 2, 4, torch.bfloat16
    else:
        llm = LLMConfig(vocab_size=151936, hidden_size=896, num_layers=24, num_attention_heads=14, num_query_groups=2,
                        ffn_hidden_size=4864, rotary_base=1e6, tie_word_embeddings=True, max_position_embeddings=32768)
        vision = VisionConfig(image_size=224, patch_size=14, hidden_size=768, num_layers=12, num_attention_heads=12,
                              ffn_hidden_size=3072, freeze=True, freeze_projector=True)
        frames, group_size, response_len, dtype = 64, 4, 64, torch.bfloat16
    cfg = VLMConfig(llm=llm, vision=vision, video_token_id=tok.video_id)
    t0 = time.perf_counter()
    torch.manual_seed(1)
    policy = build_vlm(cfg, groups, params_dtype=dtype)
    reference = mixed_precision(build_vlm(cfg, groups, params_dtype=dtype))
    reference.requires_grad_(False)
    ddp = wrap_ddp(policy, groups)
    optimizer = build_optimizer([ddp], OptimConfig(lr=1e-6, clip_grad=1.0))
    build_s = time.perf_counter() - t0
    grpo = GRPOConfig(group_size=group_size, prompts_per_step=1, pack=True, log_samples_every=0,
                      sampling=SamplingConfig(max_new_tokens=response_len, temperature=1.0, seed=3),
                      loss=GRPOLossConfig(kl_beta=0.04), rewards=(("format", 1.0),))
    text = torch.tensor(tok.encode("which colour is the shape? answer with a letter"), device="cpu")
    counter = [0]

    def draw(k):
        out = []
        for _ in range(k):
            counter[0] += 1
            video = torch.randn(frames, 3, vision.image_size, vision.image_size,
                                generator=torch.Generator().manual_seed(counter[0]))
            ids = torch.cat([torch.tensor([tok.im_start_id], device="cpu"),
                             torch.full((vision.num_video_tokens(frames),), tok.video_id, device="cpu"), text,
                             torch.tensor([tok.im_end_id], device="cpu")])
            out.append(RLPrompt(videos=(video,), prompt_ids=ids, ground_truth=GroundTruth(answer="A"),
                                content_ids=(f"check-{counter[0]}",)))
        return out

    runs = {}
    for name in ("megatron", "hf"):  # the default engine (the policy itself) and transformers
        engine = (build_engine("megatron", cfg, policy=ddp, groups=groups, tokenizer=tok, pad_token_id=tok.pad_id)
                  if name == "megatron" else build_engine("hf", cfg, tokenizer=tok, pad_token_id=tok.pad_id, dtype=dtype))
        trainer = _trainer_class("stage12_packed")(grpo, policy=ddp, optimizer=optimizer, groups=groups, tokenizer=tok,
                                                   engine=engine, reference=reference, cache=VideoEmbeddingCache(),
                                                   log=lambda s: None)
        rows = []
        for step in range(3):  # the first is the warm-up
            trainer.phases = {}
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            metrics = trainer.step(draw)
            rows.append({"step": metrics["time/step"], "encode": metrics["time/encode"], "sync": metrics["time/sync"],
                         **{p: trainer.phases.get(p, {}).get("time", 0.0) for p in ("rollout", "old", "ref", "update")},
                         "peak_gib": (torch.cuda.max_memory_allocated() / 2**30) if torch.cuda.is_available() else float("nan"),
                         "loss": metrics["train/loss"]})
        runs[name] = rows
        del engine, trainer
    params = sum(p.numel() for p in policy.parameters()) / 1e6
    lines = [f"{params:,.1f}M parameters ({'tiny CPU smoke model' if quick else 'Qwen2-0.5B-shaped LLM + ViT-B'}) in "
             f"{str(dtype)[6:]}, built in {build_s:.1f} s; {frames} frames ({vision.num_video_tokens(frames):,} video "
             f"tokens), G={group_size} responses of {response_len} tokens, packed; per rollout engine, median of 2 steps "
             "after a warm-up (sync: weights to the engine; the megatron engine needs none).", "",
             "| engine | step (s) | encode | sync | rollout | old log-probs | ref log-probs | update | peak memory (GiB) | loss finite |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    finite = True
    for name, rows in runs.items():
        med = {k: statistics.median(r[k] for r in rows[1:]) for k in rows[0]}
        ok = all(r["loss"] == r["loss"] for r in rows)
        finite = finite and ok
        lines.append(f"| {name} | {med['step']:.2f} | {med['encode']:.2f} | {med['sync']:.2f} | {med['rollout']:.2f} | "
                     f"{med['old']:.2f} | {med['ref']:.2f} | {med['update']:.2f} | {med['peak_gib']:.1f} | {ok} |")
        if not torch.cuda.is_available():
            lines[-1] = lines[-1].replace("| nan |", "| n/a (CPU) |")
    destroy_parallel()
    dist.destroy_process_group()
    return lines, not finite


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke size (the test suite runs it)")
    p.add_argument("--out", help="write the report here")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    report = [f"## GPU check ({datetime.date.today().isoformat()}, {device})", "", *_versions(), ""]
    failed = False
    for title, run in (("Attention kernels against the dense oracle", lambda: check_attention(device)),
                       ("CUDA kernels against a device-to-device copy", lambda: check_kernels(device, args.quick)),
                       ("A GRPO step at world=1", lambda: check_grpo_step(args.quick))):
        t0 = time.perf_counter()
        try:
            lines, bad = run()
        except Exception:  # noqa: BLE001 - the report says what failed, the next section still runs
            lines, bad = ["```", traceback.format_exc().strip()[-3000:], "```"], True
        failed |= bad
        report += [f"### {title} ({time.perf_counter() - t0:.0f} s){' - FAILED' if bad else ''}", "", *lines, ""]
    report.append(f"Total {time.perf_counter() - started:.0f} s; {'FAILED' if failed else 'all checks passed'}.")
    text = "\n".join(report)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
