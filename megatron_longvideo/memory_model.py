"""Per-rank peak memory of one GRPO step, predicted from the model shape, frames, G and the layout.

Used to plan a run (the largest frame count that fits a GPU in each mode) and checked against the
peaks that ``benchmarks/grpo_step.py`` measures. The prediction counts the tensors our code keeps
alive, phase by phase, and takes the largest phase:

* **static** (the whole step): policy weights, gradient buffer, optimizer state (sharded over the
  data-parallel x CP ranks by the distributed optimizer), the frozen vision tower, a resident
  reference model, and the rollout engine's weights when it stays resident (the CPU ``hf`` engine);
* **rollout**: the engine's weights when it wakes for the phase (vLLM), its KV cache, the transient
  activations of its prefill, the raw frames and the ViT's activations of the frames this rank encodes;
* **old / reference log-probs** (no grad): one micro-batch's largest layer transient, the attention
  scores (unfused attention only) and the log-softmax over the vocabulary at the targets;
* **update** (forward + backward): what autograd saves per layer for one micro-batch (all layers, or
  each layer's input plus one layer's activations under recompute), the attention probabilities
  (unfused attention only) and the vocabulary-sized tensors at the targets.

The video embeddings of a step's prompts are held from encode to update with the cache (stage 1), and
per pass without it (baseline). Working memory is what the step adds to the static part; the
benchmark measures the same quantity on CPU (RSS growth during the step).

Modes (``StepLayout.mode``), for ``ranks`` (N) ranks that share each prompt:

* ``baseline``: the ranks split the G responses (G/N each, data parallel); every rank encodes the whole
  video itself, for every use; every sequence carries its own copy (no cache, no CP, no packing);
* ``stage1``: as baseline, but the frames are encoded once, split over the N ranks, and cached;
* ``stage12``: the sequence is sharded over N CP ranks (each rank holds S/N tokens);
* ``stage12_packed``: as stage12, with the G responses packed behind one copy of the prefix.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_longvideo.models.llm import LLMConfig
from megatron_longvideo.models.vision import VisionConfig

__all__ = ["MODES", "StepLayout", "MemoryEstimate", "llm_param_count", "vision_param_count", "predict_step_memory",
           "max_frames"]

MODES = ("baseline", "stage1", "stage12", "stage12_packed")


def llm_param_count(llm: LLMConfig) -> int:
    """Parameters of the Qwen2-style LLM (embedding, layers, final norm, output layer unless tied)."""
    h, f, kv = llm.hidden_size, llm.ffn_hidden_size, llm.num_query_groups * llm.head_dim
    layer = h + h * (h + 2 * kv) + (h + 2 * kv) + h * h + h + h * 2 * f + f * h
    emb = llm.vocab_size * h
    return emb + llm.num_layers * layer + h + (0 if llm.tie_word_embeddings else emb)


def vision_param_count(vision: VisionConfig, llm_hidden: int) -> int:
    """Parameters of the ViT tower, projector and newline vector."""
    vh, vf, p = vision.hidden_size, vision.ffn_hidden_size, vision.patch_size
    patches = vision.grid**2
    embed = 3 * p * p * vh + vh + patches * vh  # patch conv (with bias), position embeddings
    layer = 2 * 2 * vh + 4 * vh * vh + 4 * vh + 2 * vh * vf + vf + vh
    proj_in = vh * (4 if vision.pooling == "merge2x2" else 1)
    projector = proj_in * llm_hidden + llm_hidden + llm_hidden * llm_hidden + llm_hidden
    return embed + vision.num_layers * layer + projector + (llm_hidden if vision.newline else 0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepLayout:
    """How one GRPO step runs (see module docstring for the modes)."""

    mode: str
    ranks: int
    """N: ranks sharing each prompt (splitting its responses, or CP ranks)."""
    group_size: int
    response_len: int
    text_len: int = 32
    """Prompt tokens besides the video."""
    prompts: int = 1
    """Prompts per step per N ranks."""
    responses_per_microbatch: Optional[int] = 1
    """Unpacked modes: sequences per micro-batch (None: a whole group). Packed: responses per packed row."""
    recompute: bool = False
    attention: str = "unfused"
    """'unfused' (our CPU attention: scores materialised) or 'flash' (fused kernels on GPU)."""
    act_bytes: int = 4
    param_bytes: int = 4
    grad_bytes: int = 4
    optimizer_bytes: int = 8
    """Adam state per parameter (+4 for an fp32 master copy of bf16 weights)."""
    distributed_optimizer: bool = False
    tensor_parallel: int = 1
    reference: str = "resident"
    """'resident', 'offloaded' (on the GPU only for its pass) or 'none' (no KL)."""
    engine: str = "resident"
    """'resident' (weights stay: the CPU hf engine) or 'sleep' (on the GPU only during the rollout: vLLM)."""
    engine_prefix_sharing: bool = False
    """The engine keeps one KV copy of a prompt for its n samples (vLLM prefix caching); else n copies."""
    engine_bytes: int = 4
    engine_prefill_chunk: Optional[int] = None
    """Tokens per engine forward when the engine chunks long prefills (vLLM's max_num_batched_tokens);
    None: the whole prompt at once (the hf engine)."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode: must be one of {MODES}, got {self.mode!r}")
        if self.mode in ("baseline", "stage1") and self.group_size % self.ranks:
            raise ValueError(f"group_size={self.group_size} must be divisible by ranks={self.ranks} in mode {self.mode}")
        if self.attention not in ("unfused", "flash"):
            raise ValueError(f"attention: 'unfused' or 'flash', got {self.attention!r}")
        if self.reference not in ("resident", "offloaded", "none"):
            raise ValueError(f"reference: 'resident', 'offloaded' or 'none', got {self.reference!r}")
        if self.engine not in ("resident", "sleep"):
            raise ValueError(f"engine: 'resident' or 'sleep', got {self.engine!r}")

    @property
    def cp(self) -> int:
        return self.ranks if self.mode.startswith("stage12") else 1

    @property
    def packed(self) -> bool:
        return self.mode == "stage12_packed"

    @property
    def responses_per_rank(self) -> int:
        return self.group_size // self.ranks if self.cp == 1 else self.group_size


@dataclasses.dataclass
class MemoryEstimate:
    """Bytes per rank: the static part and each phase's working memory on top of it."""

    static: float
    phases: dict
    """{phase: working bytes} for rollout, old, ref, update."""

    @property
    def working(self) -> float:
        return max(self.phases.values())

    @property
    def peak(self) -> float:
        return self.static + self.working

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)


def _layer_saved(llm: LLMConfig, tp: int) -> float:
    """Elements autograd keeps per token per layer, outside the attention core: two RMSNorms (input,
    scaled input), the QKV output, rotated q/k, the attention output, and the SwiGLU MLP (fc1 output,
    silu, fc2 input)."""
    h, f, kv = llm.hidden_size, llm.ffn_hidden_size, llm.num_query_groups * llm.head_dim
    return 4 * h + (h + 2 * kv) / tp + (h + kv) / tp + 2 * h / tp + (2 * f + f + f) / tp


def _layer_transient(llm: LLMConfig, tp: int) -> float:
    """Elements per token alive at once inside one layer's forward without grad."""
    h, f, kv = llm.hidden_size, llm.ffn_hidden_size, llm.num_query_groups * llm.head_dim
    return 3 * h + max((h + 2 * kv) * 2, 3 * f) / tp


def predict_step_memory(llm: LLMConfig, vision: VisionConfig, frames: int, layout: StepLayout) -> MemoryEstimate:
    """Predicted per-rank memory of one GRPO step (see module docstring)."""
    L, h, V = layout, llm.hidden_size, llm.vocab_size
    tp, cp, n = L.tensor_parallel, L.cp, L.ranks
    heads = llm.num_attention_heads / tp
    kv_dim = llm.num_query_groups * llm.head_dim / tp
    a = L.act_bytes

    # static
    p_llm, p_vis = llm_param_count(llm) / tp, vision_param_count(vision, h)
    optim_shards = n if L.distributed_optimizer else 1
    static = p_llm * (L.param_bytes + L.grad_bytes + L.optimizer_bytes / optim_shards) + p_vis * L.param_bytes
    if L.reference == "resident":
        static += (p_llm + p_vis) * L.param_bytes
    engine_weights = llm_param_count(llm) * L.engine_bytes
    if L.engine == "resident":
        static += engine_weights

    # sequence shapes
    video = vision.num_video_tokens(frames)
    prefix = video + L.text_len
    g_rank = L.responses_per_rank
    per_mb = min(L.responses_per_microbatch or g_rank, g_rank)  # responses in one micro-batch
    if L.packed:  # one row: the prefix, then the responses
        rows, row_len = 1, prefix + per_mb * L.response_len
    else:
        rows, row_len = per_mb, prefix + L.response_len
    tokens = rows * row_len / cp  # this rank's tokens in one micro-batch
    targets = per_mb * L.response_len / cp
    embeds = video * h * a * L.prompts  # one video's embeddings, all-gathered to every rank
    frame_bytes = frames * 3 * vision.image_size**2 * 4 * L.prompts

    # vision: the frames this rank encodes, one ViT layer's activations at a time (no grad)
    encode_group = 1 if L.mode == "baseline" else n
    vis_frames = -(-frames // encode_group)
    patches = vision.grid**2 + 1
    vit = vis_frames * patches * (4 * vision.hidden_size + vision.ffn_hidden_size) * a
    if L.attention == "unfused":
        vit += vis_frames * vision.num_attention_heads * patches**2 * a * 2
    encode = frame_bytes + vit + embeds

    # attention core, per layer: (saved for backward, transient on top while it runs)
    if L.attention == "flash":
        attn_saved = tokens * (heads * llm.head_dim + 2 * kv_dim * cp) * a  # q, gathered k/v, output
        attn_forward = attn_backward = tokens * 2 * kv_dim * cp * a
    else:
        # scores of local queries against the whole row ([b, heads, s/cp, s], fp32): the softmax output
        # is saved; two more such tensors live while a layer runs forward (scores, masked scores) or
        # backward (gradients of the probabilities and of the scores); keys and values are gathered
        # and expanded to every query head
        scores = rows * heads * (row_len / cp) * row_len * 4
        keys = rows * row_len * 2 * (heads * llm.head_dim + kv_dim) * a
        attn_saved, attn_forward, attn_backward = scores + keys, 2 * scores + keys, 2 * scores

    vocab = targets * V / tp * 4 * 3  # logits at the targets, log-softmax, its gradient (fp32)
    layer_saved = tokens * _layer_saved(llm, tp) * a
    held_embeds = embeds if L.mode != "baseline" else 0.0  # the cache (baseline: re-encoded per pass)

    # rollout: engine KV cache + its prefill transient + encoding
    copies = 1 if L.mode == "baseline" else (g_rank if cp == 1 else L.group_size)
    if L.engine_prefix_sharing:
        kv_tokens = prefix + copies * L.response_len
    else:
        kv_tokens = copies * (prefix + L.response_len)
    kv_cache = kv_tokens * llm.num_layers * 2 * llm.num_query_groups * llm.head_dim * L.engine_bytes
    prefill_tokens = prefix if L.engine_prefix_sharing else copies * prefix
    if L.engine_prefill_chunk:
        prefill_tokens = min(prefill_tokens, L.engine_prefill_chunk)
    engine_act = prefill_tokens * (_layer_transient(llm, 1) + 2 * h) * L.engine_bytes  # + the prompt embeddings
    rollout = encode + kv_cache + engine_act + (0 if L.engine == "resident" else engine_weights)

    forward = tokens * (_layer_transient(llm, tp) + h) * a + attn_forward + vocab
    passes = held_embeds + (encode if L.mode == "baseline" else 0.0) + frame_bytes
    old = passes + forward
    ref = old + (((p_llm + p_vis) * L.param_bytes) if L.reference == "offloaded" else 0.0)
    if L.recompute:  # every layer's input, and one layer recomputed at a time
        update_act = tokens * h * a * llm.num_layers + layer_saved + attn_saved + attn_backward
    else:
        update_act = llm.num_layers * (layer_saved + attn_saved) + attn_backward
    update = passes + update_act + vocab + tokens * h * a * 2
    phases = {"rollout": rollout, "old": old, "update": update}
    if L.reference != "none":
        phases["ref"] = ref
    return MemoryEstimate(static=static, phases=phases)


def max_frames(llm: LLMConfig, vision: VisionConfig, layout: StepLayout, capacity_bytes: float,
               *, limit: int = 8192) -> int:
    """The largest frame count (up to ``limit``) whose predicted peak fits ``capacity_bytes``; 0 if none."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if predict_step_memory(llm, vision, mid, layout).peak <= capacity_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo
