"""One GRPO step, phase by phase, in four modes measured in the same run, against the frame count.

Modes, for N ranks that share each prompt (N=2 on the CPU machine), G responses per prompt:

  baseline        the N ranks split the G responses (data parallel); each rank encodes the whole
                  video itself for every use: every rollout re-encodes it and prefills its own copy
                  (engine called with n=1 per response), and every sequence of the log-prob and
                  update passes encodes it again (no cache); one sequence per micro-batch
  stage1          MR-SP stage 1: the frames are split over the N ranks, encoded once, all-gathered
                  and cached; the rollouts and passes reuse the embeddings; sequences as baseline
  stage12         + stage 2: one sequence sharded over N CP ranks for the old-policy, reference and
                  update passes (one sequence per micro-batch)
  stage12_packed  + shared-prefix packing: the G responses behind one copy of the prefix, one row
                  (the replica's first rank draws all G responses, as the published system does)
  stage12_packed_all  the same with an engine on every rank: each draws G/N of the responses (the
                  tokens are the same: every response has its own seed); the rollout phase against
                  stage12_packed's is the "Rollouts split over ranks" table

Every mode runs the library's ``GRPOTrainer`` step (baseline: its generation re-encodes per response);
the phases (encode, rollout, old log-probs, reference log-probs, update) are timed and their per-rank
peak memory (RSS growth over the step's start, sampled by a thread; on CUDA max_memory_allocated) is
recorded, together with the memory model's prediction (``megatron_longvideo.memory_model``).
Each step draws a new video (the cache starts cold, as in training). After one warm-up step per mode,
each frame count runs ``--repeats`` steps; medians are reported. A mode whose peak exceeds
``--memory-cap-mb`` is marked OOM there and not run at larger frame counts.

    python benchmarks/grpo_step.py --out-dir docs/results/grpo_step_cpu   # 8..1024 frames, CPU
    python benchmarks/grpo_step.py --quick --out-dir /tmp/grpo_smoke       # smoke size (CI)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from megatron_longvideo.parallel.spawn import init_cpu_dist, run_ranks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PeakMemory, current_memory_mb  # noqa: E402

MODES = ("baseline", "stage1", "stage12", "stage12_packed")
SPLIT_MODE = "stage12_packed_all"
"""stage12_packed with every rank generating its share (reported beside stage12_packed, not in the mode tables)."""
LABELS = {"baseline": "baseline", "stage1": "MR-SP stage 1", "stage12": "stage 1+2", "stage12_packed": "stage 1+2 + packing",
          SPLIT_MODE: "stage 1+2 + packing, every rank generates"}
PHASES = ("encode", "rollout", "old", "ref", "update")
VOCAB_TEXTS = ["what colour is the shape in the video", "the shape is red green blue yellow",
               "answer with the letter of the option", "a b c d options shown in frames"] * 20


def _trainer_class(mode):
    """The trainer of a mode: the library's GRPOTrainer with per-phase measurement (and, for the
    layouts that split a group's responses over ranks, group advantages over the whole group)."""
    import torch.distributed as dist

    from megatron_longvideo.models.encode import encode_stats
    from megatron_longvideo.rl.rollout import generate_groups, nonempty, prompt_embeddings
    from megatron_longvideo.rl.trainer import GRPOTrainer

    class Measured(GRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.phases: dict = {}  # {phase: time, encode time, peak MB over step_base_mb}, reset per step
            self.step_base_mb = 0.0
            self.drawn: list = []  # each step's response token ids (the split modes must draw the same)

        def _measure(self, name, fn, *args):
            enc = encode_stats().seconds
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                out = fn(*args)
                elapsed = time.perf_counter() - t0
            enc = encode_stats().seconds - enc
            rec = self.phases.setdefault(name, {"time": 0.0, "encode": 0.0, "peak_mb": 0.0})
            rec["time"] += elapsed - enc
            rec["encode"] += enc
            rec["peak_mb"] = max(rec["peak_mb"], mem.peak_abs_mb - self.step_base_mb)
            return out

        def collect(self, draw):
            out = self._measure("rollout", super().collect, draw)
            self.drawn.append(out[0].responses)
            return out

        def _logprobs(self, model, ro, idx):
            return self._measure("ref" if model is self.reference else "old", super()._logprobs, model, ro, idx)

        def update(self, ro, idx, old, ref):
            return self._measure("update", super().update, ro, idx, old, ref)

    if mode in ("stage12", "stage12_packed", SPLIT_MODE):
        return Measured

    class SharedPrompt(Measured):
        """Every rank holds the same prompts and G/N of each group's responses."""

        def advantages(self, rewards):
            parts = [torch.empty_like(rewards) for _ in range(self.groups.dp_size)]
            dist.all_gather(parts, rewards.contiguous(), group=self.groups.dp)
            full = super().advantages(torch.cat(parts, dim=1))  # [groups, G]
            g = rewards.shape[1]
            return full[:, self.groups.dp_rank * g : (self.groups.dp_rank + 1) * g]

    if mode == "stage1":
        return SharedPrompt

    class Baseline(SharedPrompt):
        """Each rollout encodes the video again and prefills its own copy of the prompt."""

        def generate(self, prompts):
            out = [[] for _ in prompts]
            eos = self.tokenizer.eos_id
            for k in range(self.cfg.group_size):
                with torch.no_grad():
                    embeds = prompt_embeddings(self.policy, self.groups, prompts)  # no cache: encodes again
                seed = self.groups.dp_rank * 100003 + self.step_count * 1009 + k
                sampling = dataclasses.replace(self.cfg.sampling, n=1).for_rank(seed)
                for i, group in enumerate(generate_groups(self.engine, self.groups, embeds, sampling)):
                    out[i].append(nonempty(group[0], eos))
            return out

    return Baseline


def _worker(rank, world_size, mode, frame_counts, opts):
    init_cpu_dist()
    import torch.distributed as dist

    from megatron_longvideo.data.tokenizer import load_tokenizer
    from megatron_longvideo.models.llava_onevision.model import VLMConfig, build_vlm
    from megatron_longvideo.models.video_cache import VideoEmbeddingCache
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.rl.engines import build_engine
    from megatron_longvideo.rl.engines.base import SamplingConfig
    from megatron_longvideo.rl.losses import GRPOLossConfig
    from megatron_longvideo.rl.rewards import GroundTruth
    from megatron_longvideo.rl.rollout import RLPrompt, is_replica_leader
    from megatron_longvideo.rl.trainer import GRPOConfig
    from megatron_longvideo.training.engine import OptimConfig, build_optimizer, wrap_ddp

    tok = load_tokenizer(opts["tokenizer"])
    cp = world_size if mode.startswith("stage12") else 1
    groups = initialize_parallel(ParallelConfig(context_parallel_size=cp), seed=1)
    if mode == "stage1":  # the ranks share the prompt: split its frames over all of them
        groups = dataclasses.replace(groups, encode=groups.dp)
    llm, vision = _model(opts)
    cfg = VLMConfig(llm=llm, vision=vision, video_token_id=tok.video_id)
    torch.manual_seed(1)
    policy = build_vlm(cfg, groups, recompute_activations=opts["recompute"])
    torch.manual_seed(1)
    reference = build_vlm(cfg, groups)
    reference.requires_grad_(False)
    ddp = wrap_ddp(policy, groups)
    optimizer = build_optimizer([ddp], OptimConfig(lr=1e-5, clip_grad=1.0))
    g_rank = opts["group_size"] if cp > 1 else opts["group_size"] // world_size
    packed = mode in ("stage12_packed", SPLIT_MODE)
    grpo = GRPOConfig(
        group_size=g_rank, prompts_per_step=opts.get("prompts", 1), pack=packed,
        responses_per_microbatch=None if packed else opts["responses_per_microbatch"],
        sampling=SamplingConfig(max_new_tokens=opts["response_len"], temperature=1.0, seed=5),
        loss=GRPOLossConfig(kl_beta=0.04), rewards=(("accuracy", 1.0), ("format", 0.1)), log_samples_every=0,
    )
    every_rank = mode == SPLIT_MODE  # else the replica's first rank draws the whole group
    engine = build_engine("hf", cfg, tokenizer=tok, pad_token_id=tok.pad_id) if every_rank or is_replica_leader(groups) else None
    cache = VideoEmbeddingCache(max_bytes=0 if mode == "baseline" else 8 << 30)
    trainer = _trainer_class(mode)(grpo, policy=ddp, optimizer=optimizer, groups=groups, tokenizer=tok, engine=engine,
                                   reference=reference, cache=cache, log=lambda s: None)
    text = torch.tensor(tok.encode("which colour is the shape shown in the video answer with the letter"))
    counter = [0]

    def draw(k, frames):
        out = []
        for _ in range(k):
            counter[0] += 1  # a new video every step (same on every rank: the ranks share the prompt)
            gen = torch.Generator().manual_seed(counter[0])
            video = torch.randn(frames, 3, vision.image_size, vision.image_size, generator=gen)
            n = vision.num_video_tokens(frames)
            ids = torch.cat([torch.tensor([tok.im_start_id]), torch.full((n,), tok.video_id), text, torch.tensor([tok.im_end_id])])
            out.append(RLPrompt(frames=video, prompt_ids=ids, ground_truth=GroundTruth(answer="A", options=("red", "blue")),
                                content_id=f"bench-{counter[0]}", sample_id=str(counter[0])))
        return out

    def one_step(frames):
        trainer.phases = {}
        trainer.step_base_mb = current_memory_mb()
        with PeakMemory() as whole:
            metrics = trainer.step(lambda k: draw(k, frames))
        encode = sum(r["encode"] for r in trainer.phases.values())
        row = {p: trainer.phases.get(p, {}).get("time", 0.0) for p in PHASES if p != "encode"}
        row["encode"] = encode
        row["sync"] = metrics["time/sync"]
        row["step"] = metrics["time/step"]
        row["peak_mb"] = max([whole.peak_mb] + [r["peak_mb"] for r in trainer.phases.values()])
        row["phase_peak_mb"] = {p: r["peak_mb"] for p, r in trainer.phases.items()}
        return row

    one_step(frame_counts[0])  # warm-up: first-call costs, allocator pools
    results, oom = {}, False
    for frames in frame_counts:
        if oom:
            results[frames] = {"oom": True, "measured": False}
            continue
        trainer.drawn = []
        rows = [one_step(frames) for _ in range(opts["repeats"])]
        row = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "phase_peak_mb"}
        row["phase_peak_mb"] = {p: statistics.median(r["phase_peak_mb"].get(p, 0.0) for r in rows) for p in rows[0]["phase_peak_mb"]}
        peak = torch.tensor([row["peak_mb"]])
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # the rank that needs the most
        row["peak_mb"] = peak.item()
        row["text_len"] = len(text) + 2
        row["oom"] = opts["memory_cap_mb"] is not None and row["peak_mb"] > opts["memory_cap_mb"]
        row["measured"] = True
        row["tokens"] = hashlib.sha1(repr(trainer.drawn).encode()).hexdigest()[:12]
        oom = row["oom"]
        results[frames] = row
    destroy_parallel()
    return results


def _predicted(mode, frames, row, opts):
    """The memory model's working-memory estimates (MB) for what the worker ran: (total, per phase)."""
    from megatron_longvideo.memory_model import StepLayout, predict_step_memory

    packed = mode in ("stage12_packed", SPLIT_MODE)
    layout = StepLayout(mode="stage12_packed" if mode == SPLIT_MODE else mode, ranks=opts["ranks"], group_size=opts["group_size"], response_len=opts["response_len"],
                        text_len=row["text_len"], responses_per_microbatch=None if packed else opts["responses_per_microbatch"],
                        recompute=opts["recompute"])
    est = predict_step_memory(*_model(opts), frames, layout)
    return est.working / 2**20, {p: v / 2**20 for p, v in est.phases.items()}


def _model(opts):
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.models.llava_onevision.vision import VisionConfig

    h = opts["hidden"]
    llm = LLMConfig.tiny(vocab_size=304, hidden_size=h, num_layers=opts["layers"], num_attention_heads=4,
                         num_query_groups=2, ffn_hidden_size=4 * h)
    return llm, VisionConfig(freeze=True, freeze_projector=True)


# ------------------------------------------------------------------------------------------------ #
def _fmt_cell(row):
    if row.get("oom") and not row.get("measured"):
        return "OOM", "OOM"
    if not row.get("measured"):  # a mode left out of --modes
        return "-", "-"
    time_s = f"{row['step']:.2f}"
    mem = f"{row['peak_mb']:.0f}"
    if row.get("oom"):
        return time_s + " (OOM)", mem + " (OOM)"
    return time_s, mem


def report(results: dict, opts: dict) -> str:
    frames = opts["frames"]
    cap = opts["memory_cap_mb"]
    lines = [f"## One GRPO step against the frame count ({opts['machine']})", "",
             f"Model: LLM {opts['layers']} layers x {opts['hidden']} wide, ViT 2x32 on 32 px frames (4 tokens per frame); "
             f"{opts['ranks']} ranks share each prompt; {opts.get('prompts', 1)} prompt(s) per step; G={opts['group_size']} "
             f"responses of {opts['response_len']} tokens; "
             f"activation recompute {'on' if opts['recompute'] else 'off'}; memory cap {cap} MB per rank"
             f"{' (working memory: growth over the step start)' if cap else ''}; median of {opts['repeats']} step(s).", "",
             "Step time (s) and peak working memory per rank (MB, max over ranks):", "",
             "| frames | " + " | ".join(f"{LABELS[m]} (s)" for m in MODES) + " | " + " | ".join(f"{LABELS[m]} (MB)" for m in MODES) + " |",
             "|---:|" + "---:|" * (2 * len(MODES))]
    for f in frames:
        cells = [_fmt_cell(results[m][f]) for m in MODES]
        lines.append(f"| {f} | " + " | ".join(c[0] for c in cells) + " | " + " | ".join(c[1] for c in cells) + " |")

    def runs(m, f):
        r = results[m][f]
        return r.get("measured") and not r.get("oom")

    lines += ["", "Ratios (measured in this run, at the largest frame count both modes run):", ""]
    for slow, fast in (("baseline", "stage12"), ("baseline", "stage1"), ("stage12", "stage12_packed"), ("baseline", "stage12_packed")):
        both = [f for f in frames if runs(slow, f) and runs(fast, f)]
        if both:
            a, b = results[slow][both[-1]], results[fast][both[-1]]
            lines.append(f"- {LABELS[fast]} vs {LABELS[slow]} at {both[-1]} frames: speed-up {a['step'] / b['step']:.2f}x, "
                         f"{b['peak_mb'] / max(a['peak_mb'], 1e-9):.2f}x the memory")
    for m in MODES:
        ran = [f for f in frames if runs(m, f)]
        first_oom = next((f for f in frames if results[m][f].get("oom")), None)
        lines.append(f"- {LABELS[m]}: runs up to {ran[-1] if ran else 'none'}"
                     + (f", out of memory from {first_oom} frames" if first_oom else " (no OOM in the range)"))

    lines += ["", "Phase breakdown (s) at the largest frame count each mode runs (encode: all video encoding in the step; "
              "the other phases exclude it; sync: weights to the rollout engine):", "",
              "| mode | frames | encode | rollout | old log-probs | ref log-probs | update | sync | step |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in MODES:
        ran = [f for f in frames if runs(m, f)]
        if not ran:
            continue
        r = results[m][ran[-1]]
        lines.append(f"| {LABELS[m]} | {ran[-1]} | " + " | ".join(f"{r[p]:.2f}" for p in PHASES)
                     + f" | {r['sync']:.2f} | {r['step']:.2f} |")

    if results.get(SPLIT_MODE) and any(r.get("measured") for r in results[SPLIT_MODE].values()):
        lines += ["", f"Rollouts split over ranks: the rollout phase (s) of stage 1+2 + packing with the replica's first "
                  f"rank drawing all G responses (today's published layout) and with each of the {opts['ranks']} ranks "
                  "drawing its share (same tokens: the two runs drew identical responses in every measured step):", "",
                  "| frames | first rank draws all (s) | every rank draws its share (s) | speed-up | step (s), first / every "
                  "| same tokens |", "|---:|---:|---:|---:|---:|---|"]
        for f in frames:
            a, b = results["stage12_packed"].get(f, {}), results[SPLIT_MODE].get(f, {})
            if a.get("measured") and b.get("measured") and not (a.get("oom") or b.get("oom")):
                lines.append(f"| {f} | {a['rollout']:.3f} | {b['rollout']:.3f} | {a['rollout'] / max(b['rollout'], 1e-9):.2f}x "
                             f"| {a['step']:.2f} / {b['step']:.2f} | {'yes' if a.get('tokens') == b.get('tokens') else 'NO'} |")

    lines += ["", "Memory model check: predicted working memory (``megatron_longvideo.memory_model``) / measured, "
              "per mode and frame count:", "",
              "| frames | " + " | ".join(LABELS[m] for m in MODES) + " |", "|---:|" + "---:|" * len(MODES)]
    for f in frames:
        cells = []
        for m in MODES:
            r = results[m][f]
            if not r.get("measured"):
                cells.append("-")
            else:
                predicted = _predicted(m, f, r, opts)[0]
                cells.append(f"{predicted:.0f} / {r['peak_mb']:.0f} = {predicted / max(r['peak_mb'], 1e-9):.2f}")
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


GPU_7B = dict(ranks=8, group_size=8, response_len=512, text_len=64, act_bytes=2, param_bytes=2, grad_bytes=2,
              optimizer_bytes=12, distributed_optimizer=True, recompute=True, reference="offloaded", engine="sleep",
              engine_bytes=2, engine_prefill_chunk=8192)
"""The 8-GPU plan the capacity table assumes (see docs/performance.md)."""


def _capacity_rows(llm, vision, cap: float, image_size=None) -> list[str]:
    """Table rows: per mode and CP schedule, the largest frame count with the tile engine and with dense
    scores, the GiB at 1,024 frames and what binds at the limit."""
    from megatron_longvideo.memory_model import StepLayout, max_frames, predict_step_memory

    lines = []
    for mode in MODES:
        for comm in ("all_gather", "a2a", "p2p") if mode.startswith("stage12") else ("-",):
            common = dict(mode=mode, engine_prefix_sharing=mode != "baseline",
                          responses_per_microbatch=None if mode == "stage12_packed" else 1,
                          cp_comm_type="all_gather" if comm == "-" else comm, **GPU_7B)
            layout = StepLayout(attention="engine", **common)
            try:
                n = max_frames(llm, vision, layout, cap, image_size=image_size)
            except ValueError as e:  # Ulysses needs the heads divisible by CP
                lines.append(f"| {LABELS[mode]} | {comm} | n/a | n/a | - | - | {e} |")
                continue
            before = max_frames(llm, vision, StepLayout(attention="dense", **common), cap, image_size=image_size)
            at_limit = predict_step_memory(llm, vision, min(n + 1, 8192), layout, image_size=image_size)
            at_1024 = predict_step_memory(llm, vision, 1024, layout, image_size=image_size)
            lines.append(f"| {LABELS[mode]} | {comm} | {before:,} | {n:,}{'+' if n == 8192 else ''} | "
                         f"{at_1024.peak / 2**30:.0f} | {at_limit.peak_phase} | {at_limit.binding_term} |")
    return lines


_HEADER = ["| mode | CP schedule | before: dense scores | tile engine | GiB at 1,024 frames | phase that limits | its largest term |",
           "|---|---|---:|---:|---:|---|---|"]
_SETTING = ("G=8 responses of 512 tokens, 8 ranks sharing each prompt; bf16 weights and gradients, Adam state sharded "
            "over the 8 ranks, activation recompute, reference offloaded between its passes, rollout engine (vLLM: "
            "prefill chunks of 8,192 tokens; one KV copy of a prompt for its samples, except in the baseline) asleep "
            "outside the rollout")


def capacity_report(gpu_gib: float = 80.0, usable: float = 0.9) -> str:
    """Largest frame count per mode (and CP schedule) on 8 GPUs of ``gpu_gib`` for a Qwen2-7B +
    SigLIP-so400m shape, from the memory model: with the tile engine, and with the dense attention
    this library had before it; and what then binds."""
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.models.llava_onevision.vision import VisionConfig

    llm, vision = LLMConfig.qwen2_7b(), VisionConfig.siglip_so400m()
    lines = [f"## Predicted: largest frame count on 8 x {gpu_gib:.0f} GB (memory model, not measured)", "",
             f"Qwen2-7B LLM + SigLIP-so400m tower ({vision.tokens_per_frame} tokens per frame), {_SETTING}; "
             f"{usable:.0%} of each GPU usable.", ""] + _HEADER
    return "\n".join(lines + _capacity_rows(llm, vision, gpu_gib * usable * 2**30))


def qwen_capacity_report(gpu_gib: float = 80.0, usable: float = 0.9, image_size: int = 448) -> str:
    """As :func:`capacity_report` for Qwen2.5-VL-7B's shape with square frames of ``image_size`` pixels."""
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.models.qwen2_5_vl.vision import QwenVisionConfig

    llm = LLMConfig(vocab_size=152064, hidden_size=3584, num_layers=28, num_attention_heads=28, num_query_groups=4,
                    ffn_hidden_size=18944, max_position_embeddings=128000, rotary_base=1e6, mrope_section=(16, 24, 24))
    vision = QwenVisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                              fullatt_block_indexes=(7, 15, 23, 31), freeze=True)
    per_two = (image_size // 14) ** 2 // 4
    lines = [f"## Predicted: Qwen2.5-VL-7B, {image_size} px frames, on 8 x {gpu_gib:.0f} GB (memory model, not measured)", "",
             f"Qwen2.5-VL-7B ({per_two} tokens per two frames), {_SETTING}; {usable:.0%} of each GPU usable.", ""] + _HEADER
    return "\n".join(lines + _capacity_rows(llm, vision, gpu_gib * usable * 2**30, image_size=image_size))


def plot(results: dict, opts: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    frames = opts["frames"]
    measured = [results[m][f]["step"] for m in MODES for f in frames if results[m][f].get("measured")]
    top = max(measured) * 1.3 if measured else 1.0
    for k, m in enumerate(MODES):
        xs = [f for f in frames if results[m][f].get("measured") and not results[m][f].get("oom")]
        line = ax_t.plot(xs, [results[m][f]["step"] for f in xs], marker="o", label=LABELS[m])[0]
        ax_m.plot(xs, [results[m][f]["peak_mb"] for f in xs], marker="o", label=LABELS[m], color=line.get_color())
        ooms = [f for f in frames if results[m][f].get("oom")]
        if ooms:  # step time: an x at the top; memory: the measured peak over the cap, as an x
            y = top * (1.12 ** k)
            ax_t.scatter(ooms, [y] * len(ooms), marker="x", s=70, color=line.get_color())
            ax_t.annotate(f"OOM ({LABELS[m]})", (ooms[0], y), textcoords="offset points", xytext=(-90, -3), fontsize=7,
                          color=line.get_color())
            over = [f for f in ooms if results[m][f].get("measured")]
            ax_m.scatter(over, [results[m][f]["peak_mb"] for f in over], marker="x", s=70, color=line.get_color())
    if opts["memory_cap_mb"]:
        ax_m.axhline(opts["memory_cap_mb"], color="red", linestyle="--", label=f"cap {opts['memory_cap_mb']} MB")
    for ax, title, ylabel in ((ax_t, "GRPO step time", "seconds"), (ax_m, "peak working memory per rank", "MB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("frames")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"One GRPO step, 4 modes ({opts['machine']}; x: out of memory)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512, 1024])
    parser.add_argument("--modes", nargs="+", default=list(MODES) + [SPLIT_MODE], choices=list(MODES) + [SPLIT_MODE])
    parser.add_argument("--ranks", type=int, default=2, help="ranks sharing each prompt (N)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=1, help="prompts (groups) per step, each with its own video")
    parser.add_argument("--response-len", type=int, default=32)
    parser.add_argument("--responses-per-microbatch", type=int, default=1, help="unpacked modes")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--recompute", action="store_true", help="activation recompute in the update pass")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--memory-cap-mb", type=float, default=None, help="per-rank working memory cap: above it, OOM")
    parser.add_argument("--machine", default="CPU, 2 cores, torch " + torch.__version__.split("+")[0])
    parser.add_argument("--quick", action="store_true", help="smoke size: 4 and 8 frames, G=4, responses of 4")
    parser.add_argument("--out-dir", help="write report.md, results.json and step.png here")
    parser.add_argument("--from-json", help="only redo the report and plot from this results.json")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        opts = saved["options"]
        results = {m: {int(k): v for k, v in per.items()} for m, per in saved["results"].items()}
        return _write(results, opts, args.out_dir)
    if args.quick:
        args.frames, args.group_size, args.response_len, args.repeats = [4, 8], 4, 4, 1
    if args.group_size % args.ranks:
        parser.error(f"--group-size {args.group_size} must be divisible by --ranks {args.ranks}")
    # big allocations straight from mmap and back to the OS on free, so RSS follows what is alive
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", "65536")
    from megatron_longvideo.data.tokenizer import train_sentencepiece

    with tempfile.TemporaryDirectory(prefix="mlv_grpo_bench_") as tmp:
        tok_path = train_sentencepiece(VOCAB_TEXTS, os.path.join(tmp, "tok"), vocab_size=300)
        opts = dict(tokenizer=tok_path, group_size=args.group_size, response_len=args.response_len, prompts=args.prompts,
                    responses_per_microbatch=args.responses_per_microbatch, hidden=args.hidden, layers=args.layers,
                    recompute=args.recompute, repeats=args.repeats, memory_cap_mb=args.memory_cap_mb)
        results = {}
        for mode in MODES + (SPLIT_MODE,):
            if mode not in args.modes:
                results[mode] = {f: {"oom": False, "measured": False} for f in args.frames}
                continue
            t0 = time.perf_counter()
            results[mode] = run_ranks(_worker, args.ranks, mode, args.frames, opts, timeout=7200)[0]
            print(f"[{mode}] done in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    opts.update(frames=args.frames, ranks=args.ranks, machine=args.machine)
    return _write(results, opts, args.out_dir)


def _write(results, opts, out_dir):
    text = report(results, opts) + "\n\n" + capacity_report()
    print(text)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "report.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump({"options": {k: v for k, v in opts.items() if k != "tokenizer"}, "results": results}, f, indent=1)
        plot(results, opts, os.path.join(out_dir, "step.png"))
    return text


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
