"""One GRPO step, phase by phase, in six modes measured in the same run, against the frame count.

Modes, for N ranks that share each prompt (N=2 on the CPU machine), G responses per prompt:

  naive           the N ranks split the G responses (data parallel); each rank encodes the whole
                  video itself for every use: every rollout re-encodes it and prefills its own copy
                  (engine called with n=1 per response), and every sequence of the log-prob and
                  update passes encodes it again (no cache); one sequence per micro-batch. No real
                  system does this: it is kept as an upper bound
  mrsp_off        the published system without MR-SP (the baseline to beat): the N ranks split the G
                  responses (data parallel, no sequence parallelism); each rank encodes the whole video
                  once per pass that needs it (one rollout prefill shared by its n = G/N samples, then
                  once each for the old-policy, reference and update passes), no embedding reuse
                  across passes; one sequence per micro-batch
  stage1          MR-SP stage 1: the frames are split over the N ranks, encoded once, all-gathered
                  and cached; the rollouts and passes reuse the embeddings; sequences as mrsp_off
  stage12         + stage 2: one sequence sharded over N CP ranks for the old-policy, reference and
                  update passes (one sequence per micro-batch)
  stage12_packed  + shared-prefix packing: the G responses behind one copy of the prefix, one row
                  (the replica's first rank draws all G responses, as the published system does)
  stage12_packed_all  the same with an engine on every rank: each draws G/N of the responses (the
                  tokens are the same: every response has its own seed); the rollout phase against
                  stage12_packed's is the "Rollouts split over ranks" table

Every mode runs the library's ``GRPOTrainer`` step (naive: its generation re-encodes per response);
the phases (encode, rollout prefill, rollout decode, old log-probs, reference log-probs, update) are
timed and their per-rank peak memory (RSS growth over the step's start, sampled by a thread; on CUDA
max_memory_allocated) is recorded, together with the memory model's prediction
(``megatron_longvideo.memory_model``). Each step draws a new video (the cache starts cold, as in
training). After one warm-up step per mode, each frame count runs ``--repeats`` steps; medians are
reported. A mode whose peak exceeds ``--memory-cap-mb`` is marked OOM there and not run at larger frame
counts; one whose step takes longer than ``--time-cap-s`` is not run at larger frame counts either.

The model: by default the tiny one (LLM 2 x 64, ViT 2 x 32 on 32 px frames, 4 tokens per frame).
``--cost-match llava`` / ``qwen`` takes the CPU model of ``benchmarks/cost_model.py`` that has
LLaVA-OneVision-7B's (196) / Qwen2.5-VL-7B's (128 at 448 px) tokens per frame and their ratio of vision
FLOPs per frame to LLM FLOPs per token within 5%; the report prints both models' ratios. That match holds at
short prompts only (a 64-wide LLM at 196 tokens per frame spends 54x the 7B's share of its work in attention at
1,024 frames). ``--cost-match llava-split`` / ``qwen-split`` takes the CPU model that spends a step as the 7B does
at every frame count (the tower against the LLM matmuls per frame, and the LLM's attention per frame of context,
each within 5%), with 4 / 4.5 tokens per frame, so 4,096 frames run on two CPU cores.
``--memory-cap-scaled 80`` sets the cap from an 80 GB GPU scaled to the model (see :func:`scaled_cap_mb`).

    python benchmarks/grpo_step.py --out-dir docs/results/grpo_step_cpu   # 8..1024 frames, CPU
    python benchmarks/grpo_step.py --cost-match llava-split --frames 64 256 1024 4096 --memory-cap-scaled 80 --run-over-cap --out-dir OUT
    python benchmarks/grpo_step.py --quick --out-dir /tmp/grpo_smoke       # smoke size (CI)
    python benchmarks/grpo_step.py --quick --cost-match qwen --out-dir /tmp/grpo_smoke_qwen
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
from cost_model import MATCH_NAMES  # noqa: E402

MODES = ("naive", "mrsp_off", "stage1", "stage12", "stage12_packed")
SPLIT_MODE = "stage12_packed_all"
"""stage12_packed with every rank generating its share (reported beside stage12_packed, not in the mode tables)."""
LABELS = {"naive": "naive (re-encode per use, n=1)", "mrsp_off": "without MR-SP (published)", "stage1": "MR-SP stage 1",
          "stage12": "stage 1+2", "stage12_packed": "stage 1+2 + packing", SPLIT_MODE: "stage 1+2 + packing, every rank generates"}
MEMORY_MODES = {"naive": "baseline", "mrsp_off": "baseline", "stage1": "stage1", "stage12": "stage12",
                "stage12_packed": "stage12_packed", SPLIT_MODE: "stage12_packed"}
"""Each mode's layout in ``megatron_longvideo.memory_model`` (mrsp_off: its baseline, with one KV copy of a prompt
for the samples of an engine call)."""
DATA_PARALLEL = ("naive", "mrsp_off", "stage1")
"""Modes whose ranks split each group's responses (no CP)."""
PHASES = ("encode", "prefill", "decode", "old", "ref", "update")
"""Columns of the phase table: encode (all video encoding in the step), the rollout's prefill and decode (the rest of
the rollout: sampling, the decode steps, the broadcast), the old-policy and reference log-prob passes, the update."""
VOCAB_TEXTS = ["what colour is the shape in the video", "the shape is red green blue yellow",
               "answer with the letter of the option", "a b c d options shown in frames"] * 20


def _trainer_class(mode):
    """The trainer of a mode: the library's GRPOTrainer with per-phase measurement (and, for the
    layouts that split a group's responses over ranks, group advantages over the whole group)."""
    import torch.distributed as dist

    from megatron_longvideo.models.encode import encode_stats
    from megatron_longvideo.models.llm import unwrap
    from megatron_longvideo.rl.rollout import generate_groups, nonempty, prompt_embeddings
    from megatron_longvideo.rl.trainer import GRPOTrainer

    class Measured(GRPOTrainer):
        def __init__(self, *args, fresh_cache=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.phases: dict = {}  # {phase: time, encode time, prefill time, peak MB over step_base_mb}, reset per step
            self.step_base_mb = 0.0
            self.drawn: list = []  # each step's response token ids (the split modes must draw the same)
            self.fresh_cache = fresh_cache
            """mrsp_off: a new (empty) embedding cache for every pass, so no pass reuses another's encoding."""
            self.prefill_s = 0.0
            from megatron_longvideo.rl.engines.hf_engine import HFEngine

            if isinstance(self.engine, HFEngine):  # the hf engines (plain and multimodal RoPE): time the prompt prefill
                forward = self.engine._forward

                def timed(embeds, positions, cache, _forward=forward):
                    if embeds.shape[1] == 1:  # a decode step
                        return _forward(embeds, positions, cache)
                    t0 = time.perf_counter()
                    out = _forward(embeds, positions, cache)
                    self.prefill_s += time.perf_counter() - t0
                    return out

                self.engine._forward = timed

        def _measure(self, name, fn, *args):
            if self.fresh_cache is not None:
                self.cache = self.fresh_cache()
            enc, prefill = encode_stats().seconds, self.prefill_s
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                out = fn(*args)
                elapsed = time.perf_counter() - t0
            enc = encode_stats().seconds - enc
            rec = self.phases.setdefault(name, {"time": 0.0, "encode": 0.0, "prefill": 0.0, "peak_mb": 0.0})
            rec["time"] += elapsed - enc
            rec["encode"] += enc
            rec["prefill"] += self.prefill_s - prefill
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

    if mode in ("stage1", "mrsp_off"):
        return SharedPrompt

    class Naive(SharedPrompt):
        """Each rollout encodes the video again and prefills its own copy of the prompt."""

        def generate(self, prompts):
            out = [[] for _ in prompts]
            eos = self.tokenizer.eos_id
            positions_of = getattr(unwrap(self.policy), "rollout_positions", None)  # multimodal RoPE (Qwen2.5-VL)
            positions = positions_of(prompts) if positions_of is not None else None
            for k in range(self.cfg.group_size):
                with torch.no_grad():
                    embeds = prompt_embeddings(self.policy, self.groups, prompts)  # no cache: encodes again
                seed = self.groups.dp_rank * 100003 + self.step_count * 1009 + k
                sampling = dataclasses.replace(self.cfg.sampling, n=1).for_rank(seed)
                for i, group in enumerate(generate_groups(self.engine, self.groups, embeds, sampling, positions=positions)):
                    out[i].append(nonempty(group[0], eos))
            return out

    return Naive


def _worker(rank, world_size, mode, frame_counts, opts):
    init_cpu_dist()
    import torch.distributed as dist

    from megatron_longvideo.data.tokenizer import load_tokenizer
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
    cfg, build, image_size, num_video_tokens = _vlm(opts, tok.video_id)
    torch.manual_seed(1)
    policy = build(cfg, groups, recompute_activations=opts["recompute"])
    torch.manual_seed(1)
    reference = build(cfg, groups)
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
    cache = VideoEmbeddingCache(max_bytes=0 if mode == "naive" else 8 << 30)
    fresh = (lambda: VideoEmbeddingCache(max_bytes=8 << 30)) if mode == "mrsp_off" else None
    trainer = _trainer_class(mode)(grpo, policy=ddp, optimizer=optimizer, groups=groups, tokenizer=tok, engine=engine,
                                   reference=reference, cache=cache, log=lambda s: None, fresh_cache=fresh)
    text = torch.tensor(tok.encode("which colour is the shape shown in the video answer with the letter"))
    counter = [0]

    def draw(k, frames):
        out = []
        for _ in range(k):
            counter[0] += 1  # a new video every step (same on every rank: the ranks share the prompt)
            gen = torch.Generator().manual_seed(counter[0])
            video = torch.randn(frames, 3, image_size, image_size, generator=gen)
            n = num_video_tokens(frames)
            ids = torch.cat([torch.tensor([tok.im_start_id]), torch.full((n,), tok.video_id), text, torch.tensor([tok.im_end_id])])
            out.append(RLPrompt(videos=(video,), prompt_ids=ids, ground_truth=GroundTruth(answer="A", options=("red", "blue")),
                                content_ids=(f"bench-{counter[0]}",), sample_id=str(counter[0])))
        return out

    def one_step(frames):
        trainer.phases = {}
        trainer.step_base_mb = current_memory_mb()
        with PeakMemory() as whole:
            metrics = trainer.step(lambda k: draw(k, frames))
        rollout = trainer.phases.get("rollout", {})
        row = {p: trainer.phases.get(p, {}).get("time", 0.0) for p in ("old", "ref", "update")}
        row["rollout"] = rollout.get("time", 0.0)  # without its encoding
        row["prefill"] = rollout.get("prefill", 0.0)
        row["decode"] = row["rollout"] - row["prefill"]
        row["encode"] = sum(r["encode"] for r in trainer.phases.values())
        row["phase_encode"] = {p: r["encode"] for p, r in trainer.phases.items()}
        row["sync"] = metrics["time/sync"]
        row["step"] = metrics["time/step"]
        row["peak_mb"] = max([whole.peak_mb] + [r["peak_mb"] for r in trainer.phases.values()])
        row["phase_peak_mb"] = {p: r["peak_mb"] for p, r in trainer.phases.items()}
        return row

    one_step(frame_counts[0])  # warm-up: first-call costs, allocator pools
    results, stop = {}, None
    for frames in frame_counts:
        if stop:
            results[frames] = {"oom": stop == "oom", "measured": False, "skipped": stop}
            continue
        trainer.drawn = []
        rows = [one_step(frames) for _ in range(opts["repeats"])]
        per_phase = ("phase_peak_mb", "phase_encode")
        row = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k not in per_phase}
        for key in per_phase:
            row[key] = {p: statistics.median(r[key].get(p, 0.0) for r in rows) for p in rows[0][key]}
        peak = torch.tensor([row["peak_mb"], row["step"]])
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # the rank that needs the most; every rank stops together
        row["peak_mb"] = peak[0].item()
        row["text_len"] = len(text) + 2
        row["oom"] = _over_cap(row, opts["memory_cap_mb"])
        row["measured"] = True
        row["tokens"] = hashlib.sha1(repr(trainer.drawn).encode()).hexdigest()[:12]
        if row["oom"] and not opts.get("run_over_cap"):
            stop = "oom"
        elif opts.get("time_cap_s") is not None and peak[1].item() > opts["time_cap_s"]:
            stop = "time"
        results[frames] = row
    destroy_parallel()
    return results


def _predicted(mode, frames, row, opts):
    """The memory model's working-memory estimates (MB) for what the worker ran: (total, per phase)."""
    from megatron_longvideo.memory_model import StepLayout, predict_step_memory

    packed = mode in ("stage12_packed", SPLIT_MODE)
    layout = StepLayout(mode=MEMORY_MODES[mode], ranks=opts["ranks"], group_size=opts["group_size"], response_len=opts["response_len"],
                        text_len=row["text_len"], responses_per_microbatch=None if packed else opts["responses_per_microbatch"],
                        recompute=opts["recompute"], engine_prefix_sharing=mode != "naive")
    llm, vision, image_size, family = _model(opts)
    est = predict_step_memory(llm, vision, frames, layout, image_size=image_size if family == "qwen2_5_vl" else None)
    return est.working / 2**20, {p: v / 2**20 for p, v in est.phases.items()}


def _model(opts):
    """(LLM config, tower config, frame size in pixels, family) of the benchmark's model: the tiny LLaVA-OneVision
    one (``--hidden`` x ``--layers``), or the ``--cost-match`` CPU model of ``cost_model``."""
    if opts.get("cost_match"):
        from cost_model import matched

        m = matched(opts["cost_match"], vocab_size=304)
        return m.llm, m.vision, m.image_size, m.reference.family
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.models.llava_onevision.vision import VisionConfig

    h = opts["hidden"]
    llm = LLMConfig.tiny(vocab_size=304, hidden_size=h, num_layers=opts["layers"], num_attention_heads=4,
                         num_query_groups=2, ffn_hidden_size=4 * h)
    vision = VisionConfig(freeze=True, freeze_projector=True)
    return llm, vision, vision.image_size, "llava_onevision"


def _vlm(opts, video_token_id):
    """(model config, builder, frame size, video placeholder tokens of T frames) of the benchmark's model."""
    llm, vision, image_size, family = _model(opts)
    if family == "qwen2_5_vl":
        from megatron_longvideo.models.qwen2_5_vl.model import Qwen25VLConfig, build_qwen25vl

        cfg = Qwen25VLConfig(llm=llm, vision=vision, video_token_id=video_token_id)
        return cfg, build_qwen25vl, image_size, lambda t: cfg.num_video_tokens(t, image_size, image_size)
    from megatron_longvideo.models.llava_onevision.model import VLMConfig, build_vlm

    return VLMConfig(llm=llm, vision=vision, video_token_id=video_token_id), build_vlm, image_size, vision.num_video_tokens


def _reference(opts):
    """The 7B reference the model stands for (LLaVA-OneVision-7B unless ``--cost-match qwen``)."""
    from cost_model import REFERENCES

    return REFERENCES[(opts.get("cost_match") or "llava").removesuffix("-split")]()


def scaled_cap_mb(opts, gpu_gib: float, usable: float = 0.9) -> float:
    """A per-rank working-memory cap (MB) that is to the CPU model what a ``gpu_gib`` GPU is to its 7B reference:
    the memory model's working memory of the CPU model, in this run's stage 1+2 + packing layout, at the frame
    count where the reference in stage 1+2 + packing fills ``usable`` of the GPU under the 8-GPU plan ``GPU_7B``.
    So at the cap stage 1+2 + packing runs as far as it would on the GPUs (as far as the memory model is right),
    and the other modes run out where their memory, relative to it, makes them."""
    from megatron_longvideo.memory_model import StepLayout, max_frames, predict_step_memory

    ref = _reference(opts)
    qwen = ref.family == "qwen2_5_vl"
    layout = StepLayout(mode="stage12_packed", engine_prefix_sharing=True, responses_per_microbatch=None, **GPU_7B)
    frames = max_frames(ref.llm, ref.vision, layout, gpu_gib * usable * 2**30, image_size=ref.image_size if qwen else None)
    llm, vision, image_size, family = _model(opts)
    ours = StepLayout(mode="stage12_packed", ranks=opts["ranks"], group_size=opts["group_size"], response_len=opts["response_len"],
                      text_len=16, responses_per_microbatch=None, recompute=opts["recompute"], engine_prefix_sharing=True)
    est = predict_step_memory(llm, vision, frames, ours, image_size=image_size if family == "qwen2_5_vl" else None)
    opts["memory_cap_frames"] = frames
    return est.working / 2**20


def _describe(opts) -> str:
    llm, vision, image_size, family = _model(opts)
    if family == "qwen2_5_vl":
        tower = f"Qwen2.5-VL ViT {vision.depth} x {vision.hidden_size} on {image_size} px frames"
    else:
        tower = f"SigLIP-style ViT {vision.num_layers} x {vision.hidden_size} on {image_size} px frames"
    from cost_model import tokens_per_frame

    return (f"LLM {llm.num_layers} layers x {llm.hidden_size} wide, {tower} "
            f"({tokens_per_frame(vision, image_size=image_size):g} tokens per frame)")


def cost_report(opts) -> str:
    """The cost ratios of the benchmark's model and of the 7B reference it stands for (``cost_model``)."""
    import cost_model as cm

    llm, vision, image_size, _ = _model(opts)
    ref = _reference(opts)
    return "\n".join([
        "## Cost ratios: this model against the 7B it stands for (`benchmarks/cost_model.py`)", "",
        "ratio = vision FLOPs per frame / LLM matmul FLOPs per token; frame ratio = vision FLOPs per frame / the LLM's "
        "matmul FLOPs over the frame's tokens; LLM attention / matmul: the LLM's causal attention over a prompt of that "
        "many frames against its matmuls; vision share: the tower's share of the prompt's forward FLOPs. A `-split` "
        "model matches the frame ratio and the attention per frame (so the step's split of its work at every frame "
        "count); a plain match the tokens per frame and the ratio (exact at short prompts only).", "",
        cm.cost_table([(ref.name, ref.llm, ref.vision, ref.image_size), ("this run: " + _describe(opts), llm, vision, image_size)],
                      (1024, 4096))])


# ------------------------------------------------------------------------------------------------ #
def _fmt_cell(row):
    if row.get("oom") and not row.get("measured"):
        return "OOM", "OOM"
    if row.get("skipped") == "time":
        return "skipped (time cap)", "-"
    if not row.get("measured"):  # a mode left out of --modes
        return "-", "-"
    time_s = f"{row['step']:.2f}"
    mem = f"{row['peak_mb']:.0f}"
    if row.get("oom"):
        return time_s + " (OOM)", mem + " (OOM)"
    return time_s, mem


def _runs(results, m, f):
    r = results.get(m, {}).get(f, {})
    return bool(r.get("measured")) and not r.get("oom")


def report(results: dict, opts: dict) -> str:
    frames = opts["frames"]
    cap = opts["memory_cap_mb"]
    modes = [m for m in MODES if any(r.get("measured") for r in results[m].values())] or list(MODES)
    cap_text = f"{cap:.0f} MB per rank" if cap else "none"
    if cap and opts.get("memory_cap_scaled"):
        cap_text += (f" (8 x {opts['memory_cap_scaled']:g} GB scaled to the model, `scaled_cap_mb`: the reference's stage 1+2 + "
                     f"packing fits {opts.get('memory_cap_frames', '?')} frames there)")
    lines = [f"## One GRPO step against the frame count ({opts['machine']})", "",
             f"Model: {_describe(opts)}; {opts['ranks']} ranks share each prompt; {opts.get('prompts', 1)} prompt(s) per step; "
             f"G={opts['group_size']} responses of {opts['response_len']} tokens; "
             f"activation recompute {'on' if opts['recompute'] else 'off'}; memory cap {cap_text}"
             f"{' (working memory: growth over the step start)' if cap else ''}; median of {opts['repeats']} step(s)"
             + (f" in each of {opts['launches']} launches of every mode, the modes in turn, then the median over the "
                f"launches" if opts.get("launches", 1) > 1 else "") + ".", "",
             f"Command: `{opts.get('command', 'not recorded in this results.json')}`", "",
             "Step time (s) and peak working memory per rank (MB, max over ranks):", "",
             "| frames | " + " | ".join(f"{LABELS[m]} (s)" for m in modes) + " | " + " | ".join(f"{LABELS[m]} (MB)" for m in modes) + " |",
             "|---:|" + "---:|" * (2 * len(modes))]
    for f in frames:
        cells = [_fmt_cell(results[m][f]) for m in modes]
        lines.append(f"| {f} | " + " | ".join(c[0] for c in cells) + " | " + " | ".join(c[1] for c in cells) + " |")

    over = bool(opts.get("run_over_cap"))

    def runs(m, f):  # a measured cell the ratios may use (with --run-over-cap also one over the cap, starred)
        return _runs(results, m, f) or (over and bool(results.get(m, {}).get(f, {}).get("measured")))

    def star(*cells):
        return "*" if any(c.get("oom") for c in cells) else ""

    if "mrsp_off" in modes:
        others = [m for m in modes if m != "mrsp_off"]
        lines += ["", f"Speed-up over {LABELS['mrsp_off']} (its step time / the mode's, same run; > 1: the mode is faster):", "",
                  "| frames | " + " | ".join(LABELS[m] for m in others) + " |", "|---:|" + "---:|" * len(others)]
        for f in frames:
            cells = []
            for m in others:
                if runs("mrsp_off", f) and runs(m, f):
                    cells.append(f"{results['mrsp_off'][f]['step'] / max(results[m][f]['step'], 1e-9):.2f}x"
                                 + star(results["mrsp_off"][f], results[m][f]))
                else:
                    cells.append("-")
            lines.append(f"| {f} | " + " | ".join(cells) + " |")
        if over:
            lines += ["", "\\* one of the two modes is over the memory cap there (it would not fit the scaled device); "
                      "measured anyway (`--run-over-cap`)."]
        spread = [f for f in frames if len(results["mrsp_off"][f].get("launch_steps", ())) > 1]
        if spread:
            lines += ["", f"Launch spread of that speed-up (the mode's launch k against {LABELS['mrsp_off']}'s launch k, "
                      f"over {opts['launches']} launches; min / median / max):", "",
                      "| frames | " + " | ".join(LABELS[m] for m in others) + " |", "|---:|" + "---|" * len(others)]
            for f in spread:
                cells = []
                for m in others:
                    base, mine = results["mrsp_off"][f].get("launch_steps"), results[m][f].get("launch_steps")
                    if base and mine and len(base) == len(mine):
                        ratios = sorted(b / max(x, 1e-9) for b, x in zip(base, mine))
                        cells.append(f"{ratios[0]:.2f}x / {statistics.median(ratios):.2f}x / {ratios[-1]:.2f}x")
                    else:
                        cells.append("-")
                lines.append(f"| {f} | " + " | ".join(cells) + " |")

    lines += ["", "Ratios (measured in this run, at the largest frame count both modes run"
              + ("; * over the memory cap" if over else "") + "):", ""]
    for slow, fast in (("mrsp_off", "stage1"), ("mrsp_off", "stage12"), ("mrsp_off", "stage12_packed"),
                       ("stage12", "stage12_packed"), ("naive", "mrsp_off"), ("naive", "stage12_packed")):
        both = [f for f in frames if runs(slow, f) and runs(fast, f)]
        if both:
            a, b = results[slow][both[-1]], results[fast][both[-1]]
            lines.append(f"- {LABELS[fast]} vs {LABELS[slow]} at {both[-1]} frames{star(a, b)}: speed-up "
                         f"{a['step'] / b['step']:.2f}x, {b['peak_mb'] / max(a['peak_mb'], 1e-9):.2f}x the memory")
    for m in modes:
        ran = [f for f in frames if _runs(results, m, f)]
        first_oom = next((f for f in frames if results[m][f].get("oom")), None)
        first_skip = next((f for f in frames if results[m][f].get("skipped") == "time"), None)
        lines.append(f"- {LABELS[m]}: {'fits the cap' if over else 'runs'} up to {ran[-1] if ran else 'none'}"
                     + (f", out of memory from {first_oom} frames" if first_oom else " (no OOM in the range)")
                     + (f", not run from {first_skip} frames (time cap {opts.get('time_cap_s')} s)" if first_skip else ""))

    lines += ["", "Phase breakdown (s) per mode and frame count (encode: all video encoding in the step; the other phases "
              "exclude it; prefill: the rollout engine's prompt prefill, on the rank that generates; decode: the rest of "
              "the rollout; sync: weights to the rollout engine):", "",
              "| mode | frames | encode | rollout prefill | rollout decode | old log-probs | ref log-probs | update | sync | step |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in modes:
        for f in frames:
            if not runs(m, f):
                continue
            r = results[m][f]
            lines.append(f"| {LABELS[m]}{star(r)} | {f} | " + " | ".join(f"{r.get(p, 0.0):.3f}" for p in PHASES)
                         + f" | {r['sync']:.3f} | {r['step']:.2f} |")

    if results.get(SPLIT_MODE) and any(r.get("measured") for r in results[SPLIT_MODE].values()):
        lines += ["", f"Rollouts split over ranks: the rollout phase (s) of stage 1+2 + packing with the replica's first "
                  f"rank drawing all G responses (today's published layout) and with each of the {opts['ranks']} ranks "
                  "drawing its share (same tokens: the two runs drew identical responses in every measured step):", "",
                  "| frames | first rank draws all (s) | every rank draws its share (s) | speed-up | step (s), first / every "
                  "| same tokens |", "|---:|---:|---:|---:|---:|---|"]
        for f in frames:
            a, b = results["stage12_packed"].get(f, {}), results[SPLIT_MODE].get(f, {})
            if runs("stage12_packed", f) and runs(SPLIT_MODE, f):
                lines.append(f"| {f} | {a['rollout']:.3f} | {b['rollout']:.3f} | {a['rollout'] / max(b['rollout'], 1e-9):.2f}x "
                             f"| {a['step']:.2f} / {b['step']:.2f} | {'yes' if a.get('tokens') == b.get('tokens') else 'NO'} |")

    lines += ["", "Memory model check: predicted working memory (``megatron_longvideo.memory_model``; naive and without MR-SP: "
              "its baseline layout, without and with one KV copy per engine call) / measured, per mode and frame count:", "",
              "| frames | " + " | ".join(LABELS[m] for m in modes) + " |", "|---:|" + "---:|" * len(modes)]
    for f in frames:
        cells = []
        for m in modes:
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
            common = dict(mode=MEMORY_MODES[mode], engine_prefix_sharing=mode != "naive",
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
            "prefill chunks of 8,192 tokens; one KV copy of a prompt for its samples, except in the naive mode) asleep "
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
    if not measured:
        plt.close(fig)
        return
    top = max(measured) * 1.3 if measured else 1.0
    for k, m in enumerate(MODES):
        over_cap = bool(opts.get("run_over_cap"))  # steps over the cap were still measured: drawn on the time line
        xs = [f for f in frames if results[m][f].get("measured") and (over_cap or not results[m][f].get("oom"))]
        line = ax_t.plot(xs, [results[m][f]["step"] for f in xs], marker="o", label=LABELS[m])[0]
        ax_m.plot(xs, [results[m][f]["peak_mb"] for f in xs], marker="o", label=LABELS[m], color=line.get_color())
        ooms = [f for f in frames if results[m][f].get("oom")]
        over = [f for f in ooms if results[m][f].get("measured")]
        # step time: an x at the top where not run, an x on the line where measured over the cap; memory: the
        # measured peak over the cap, as an x
        unrun = [f for f in ooms if f not in over or not over_cap]
        if unrun:
            y = top * (1.12 ** k)
            ax_t.scatter(unrun, [y] * len(unrun), marker="x", s=70, color=line.get_color())
            ax_t.annotate(f"OOM ({LABELS[m]})", (unrun[0], y), textcoords="offset points", xytext=(-90, -3), fontsize=7,
                          color=line.get_color())
        if over_cap and over:
            ax_t.scatter(over, [results[m][f]["step"] for f in over], marker="x", s=70, color=line.get_color())
        ax_m.scatter(over, [results[m][f]["peak_mb"] for f in over], marker="x", s=70, color=line.get_color())
    if opts["memory_cap_mb"]:
        ax_m.axhline(opts["memory_cap_mb"], color="red", linestyle="--", label=f"cap {opts['memory_cap_mb']:.0f} MB")
    for ax, title, ylabel in ((ax_t, "GRPO step time", "seconds"), (ax_m, "peak working memory per rank", "MB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("frames")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"One GRPO step, {len(MODES)} modes ({_describe(opts)}; {opts['machine']}; x: out of memory"
                 f"{', measured anyway' if opts.get('run_over_cap') else ''})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512, 1024])
    parser.add_argument("--modes", nargs="+", default=list(MODES) + [SPLIT_MODE], choices=list(MODES) + [SPLIT_MODE])
    parser.add_argument("--ranks", type=int, default=2, help="ranks sharing each prompt (N)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=1, help="prompts (groups) per step, each with its own video")
    parser.add_argument("--response-len", type=int, default=32)
    parser.add_argument("--responses-per-microbatch", type=int, default=1, help="unpacked modes")
    parser.add_argument("--hidden", type=int, default=64, help="LLM width of the tiny model (not with --cost-match)")
    parser.add_argument("--layers", type=int, default=2, help="LLM layers of the tiny model (not with --cost-match)")
    parser.add_argument("--cost-match", choices=list(MATCH_NAMES), default=None,
                        help="llava / qwen: the CPU model with LLaVA-OneVision-7B's / Qwen2.5-VL-7B's tokens per frame and "
                             "vision/LLM FLOPs ratio; llava-split / qwen-split: the one that splits a step's work between "
                             "tower, LLM matmuls and LLM attention as the 7B does (benchmarks/cost_model.py)")
    parser.add_argument("--recompute", action="store_true", help="activation recompute in the update pass")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--launches", type=int, default=1,
                        help="start every mode this many times, the modes in turn (fresh processes each time); a cell is "
                             "the median over the launches of each launch's median step, and the report adds the "
                             "launches' spread of the speed-ups (one launch's ratios at small frame counts vary by launch)")
    parser.add_argument("--memory-cap-mb", type=float, default=None, help="per-rank working memory cap: above it, OOM")
    parser.add_argument("--memory-cap-scaled", type=float, default=None, metavar="GPU_GB",
                        help="the cap of a GPU of this many GB scaled to the model (scaled_cap_mb); overrides --memory-cap-mb")
    parser.add_argument("--run-over-cap", action="store_true",
                        help="a mode over the memory cap is marked OOM but still run at larger frame counts (ratios starred)")
    parser.add_argument("--time-cap-s", type=float, default=None,
                        help="a mode whose step takes longer is not run at larger frame counts")
    parser.add_argument("--timeout-s", type=float, default=7200.0, help="wall-clock limit of one mode's whole run")
    parser.add_argument("--machine", default="CPU, 2 cores, torch " + torch.__version__.split("+")[0])
    parser.add_argument("--quick", action="store_true", help="smoke size: 2 and 4 frames (or --frames), G=4, responses of 4")
    parser.add_argument("--out-dir", help="write report.md, results.json and step.png here")
    parser.add_argument("--from-json", help="only redo the report and plot from this results.json")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        opts = saved["options"]
        results = {("naive" if m == "baseline" else m): {int(k): v for k, v in per.items()}  # "baseline": the naive mode's old name
                   for m, per in saved["results"].items()}
        for m in MODES + (SPLIT_MODE,):
            results.setdefault(m, {f: {"oom": False, "measured": False} for f in opts["frames"]})
        if opts.get("memory_cap_scaled"):  # the cap comes from the memory model: as it stands now
            _recap(results, opts, scaled_cap_mb(opts, opts["memory_cap_scaled"]))
        return _write(results, opts, args.out_dir)
    if args.quick:  # smoke size (frames: 2 and 4, unless --frames is given)
        frames_given = args.frames != parser.get_default("frames")
        args.frames = args.frames if frames_given else [2, 4]
        args.group_size, args.response_len, args.repeats = 4, 4, 1
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
                    recompute=args.recompute, repeats=args.repeats, memory_cap_mb=args.memory_cap_mb,
                    cost_match=args.cost_match, time_cap_s=args.time_cap_s, run_over_cap=args.run_over_cap, memory_cap_scaled=args.memory_cap_scaled,
                    ranks=args.ranks, frames=args.frames, launches=args.launches,
                    command="python benchmarks/grpo_step.py " + " ".join(argv if argv is not None else sys.argv[1:]))
        if args.memory_cap_scaled:
            opts["memory_cap_mb"] = scaled_cap_mb(opts, args.memory_cap_scaled)
        if args.launches < 1:
            parser.error(f"--launches must be at least 1, got {args.launches}")
        launched: dict = {mode: [] for mode in args.modes}
        for launch in range(args.launches):  # the modes in turn, so a slow spell of the machine falls on all of them
            for mode in MODES + (SPLIT_MODE,):
                if mode in args.modes:
                    t0 = time.perf_counter()
                    launched[mode].append(run_ranks(_worker, args.ranks, mode, args.frames, opts, timeout=args.timeout_s)[0])
                    print(f"[{mode}] launch {launch + 1}/{args.launches} done in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        results = {mode: merge_launches(launched[mode], opts) if mode in launched else
                   {f: {"oom": False, "measured": False} for f in args.frames} for mode in MODES + (SPLIT_MODE,)}
    opts.update(frames=args.frames, ranks=args.ranks, machine=args.machine)
    return _write(results, opts, args.out_dir)


def _over_cap(row: dict, cap_mb) -> bool:
    """Whether a measured row's peak working memory is over the cap (None: no cap)."""
    return cap_mb is not None and row["peak_mb"] > cap_mb


def merge_launches(launches: list, opts: dict) -> dict:
    """One mode's per-frame rows from several launches -> one row per frame count: the median over the launches of
    every number (and of every phase's), OOM against the cap from the median peak; ``launch_steps`` keeps each
    launch's step time, and ``tokens`` the drawn tokens' hash when every launch drew the same (else each launch's, in order). A
    frame count some launch did not measure keeps the first such launch's row."""
    if len(launches) == 1:
        return launches[0]
    merged = {}
    for frames in launches[0]:
        rows = [launch[frames] for launch in launches]
        if not all(r.get("measured") for r in rows):
            merged[frames] = next(r for r in rows if not r.get("measured"))
            continue
        row = {}
        for key, value in rows[0].items():
            if isinstance(value, (bool, str)):
                continue
            if isinstance(value, dict):
                row[key] = {p: statistics.median(r[key].get(p, 0.0) for r in rows) for p in value}
            elif isinstance(value, (int, float)):
                row[key] = statistics.median(r[key] for r in rows)
        row["measured"] = True
        row["oom"] = _over_cap(row, opts["memory_cap_mb"])
        row["text_len"] = rows[0]["text_len"]
        hashes = [r["tokens"] for r in rows]  # another mode's merged row compares equal only if each launch drew the same
        row["tokens"] = hashes[0] if len(set(hashes)) == 1 else "/".join(hashes)
        row["launch_steps"] = [r["step"] for r in rows]
        merged[frames] = row
    return merged


def _recap(results, opts, cap_mb: float) -> None:
    """Re-flags the measured cells of a saved run against ``cap_mb`` (a scaled cap recomputed with the memory model
    as it stands). A cell that was never measured keeps what the run said of it, and is reported on stderr when
    the cap moved, since it might fit now."""
    moved = abs(cap_mb - opts["memory_cap_mb"]) > 1e-9
    opts["memory_cap_mb"] = cap_mb
    for mode, per in results.items():
        for frames, row in per.items():
            if row.get("measured"):
                row["oom"] = _over_cap(row, cap_mb)
            elif moved and row.get("skipped"):
                print(f"[{mode}] {frames} frames: not measured ({row['skipped']} at the run's cap); the cap is now "
                      f"{cap_mb:.0f} MB, so rerun to know whether it fits", file=sys.stderr)


def _write(results, opts, out_dir):
    text = report(results, opts) + "\n\n" + cost_report(opts) + "\n\n" + capacity_report()
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
