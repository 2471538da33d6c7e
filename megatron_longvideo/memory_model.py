"""Per-rank peak memory of one GRPO step, predicted from the model shape, frames, G and the layout.

Used to plan a run (the largest frame count that fits a GPU in each mode) and checked against the
peaks that ``benchmarks/grpo_step.py`` measures. The prediction counts the tensors our code keeps
alive, phase by phase, and takes the largest phase:

* **static** (the whole step): policy weights, gradient buffer, optimizer state (sharded over the
  data-parallel x CP ranks by the distributed optimizer), the frozen vision tower, a resident
  reference model, and the rollout engine's weights when it stays resident (the CPU ``hf`` engine);
* **rollout**: the engine's weights when it wakes for the phase (vLLM), its KV cache, the transient
  activations of its prefill, the raw frames and the ViT's activations of the frames this rank encodes;
* **old / reference log-probs** (no grad): one micro-batch's largest layer transient, the attention's
  working memory (:func:`attention_terms`) and the log-softmax over the vocabulary at the targets;
* **update** (forward + backward): what autograd saves per layer for one micro-batch (all layers, or
  each layer's input plus one layer's activations under recompute), what the attention keeps for its
  backward and its backward's working memory, and the vocabulary-sized tensors at the targets.

The attention terms are those of the library's tile engine (per CP mode), fitted to what
``megatron_longvideo.memory_meter`` measures on one layer (``tests/test_memory_model.py`` checks them
within 25%; most configurations agree within 10%); ``attention="dense"`` gives the attention this
library had before (scores materialised), for comparison.

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
from megatron_longvideo.models.llava_onevision.vision import VisionConfig

__all__ = ["MODES", "StepLayout", "MemoryEstimate", "llm_param_count", "vision_param_count", "predict_step_memory",
           "max_frames", "attention_terms"]

MODES = ("baseline", "stage1", "stage12", "stage12_packed")


def llm_param_count(llm: LLMConfig) -> int:
    """Parameters of the Qwen2-style LLM (embedding, layers, final norm, output layer unless tied)."""
    h, f, kv = llm.hidden_size, llm.ffn_hidden_size, llm.num_query_groups * llm.head_dim
    layer = h + h * (h + 2 * kv) + (h + 2 * kv) + h * h + h + h * 2 * f + f * h
    emb = llm.vocab_size * h
    return emb + llm.num_layers * layer + h + (0 if llm.tie_word_embeddings else emb)


def _is_qwen(vision) -> bool:
    return hasattr(vision, "temporal_patch_size")  # the Qwen2.5-VL tower's config


def vision_param_count(vision: VisionConfig, llm_hidden: int, *, tensor_parallel: int = 1) -> int:
    """Parameters of the ViT tower, projector and newline vector (SigLIP family), or of the Qwen2.5-VL
    tower and its merger (a ``QwenVisionConfig``), on one rank. ``tensor_parallel`` > 1: one rank's share
    of a Qwen2.5-VL tower sharded over that many TP ranks (``encode_group="cp"``): heads, SwiGLU and the
    merger's fc1 / fc2 split, the patch embedding, norms and row-parallel biases whole. The SigLIP tower
    is always replicated."""
    t = tensor_parallel
    if _is_qwen(vision):
        c, f, u = vision.hidden_size, vision.intermediate_size, vision.merge_unit
        if c % t or f % t:
            raise ValueError(f"tensor_parallel={t} does not divide the tower (hidden_size={c}, intermediate_size={f})")
        split = 3 * c * c + 3 * c + c * c + 2 * (c * f + f) + f * c  # qkv, proj weight, SwiGLU fc1, fc2 weight
        layer = 2 * c + c + c + split // t  # norms, proj and fc2 biases (replicated), the split part
        merger = c + ((u * c) * (u * c) + u * c + (u * c) * vision.out_hidden_size) // t + vision.out_hidden_size
        return vision.patch_dim * c + vision.depth * layer + merger
    if t != 1:
        raise ValueError(f"tensor_parallel={t}: the SigLIP family's tower is replicated over TP (use 1)")
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
    attention: str = "engine"
    """'engine' (the tile engine: fused kernels, no scores) or 'dense' (scores materialised: the attention
    before the engine, kept for comparison)."""
    cp_comm_type: str = "all_gather"
    """The CP attention schedule: 'all_gather', 'a2a' or 'p2p' (see megatron_longvideo.attention.core)."""
    act_bytes: int = 4
    param_bytes: int = 4
    grad_bytes: int = 4
    optimizer_bytes: int = 8
    """Adam state per parameter (+4 for an fp32 master copy of bf16 weights)."""
    distributed_optimizer: bool = False
    tensor_parallel: int = 1
    encode_group: str = "cp"
    """The ranks that split a video's frames, as ``ParallelConfig.encode_group``: 'cp', the N ranks (with
    ``tensor_parallel`` > 1 the Qwen2.5-VL tower is then sharded over TP: its weights and most of its
    activations divide by TP), or 'tp_cp', the N x TP ranks (the tower replicated). 'cp' is what this model
    assumed before the field existed, hence the default."""
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
        if self.attention not in ("engine", "dense"):
            raise ValueError(f"attention: 'engine' or 'dense', got {self.attention!r}")
        if self.cp_comm_type not in ("all_gather", "a2a", "p2p"):
            raise ValueError(f"cp_comm_type: 'all_gather', 'a2a' or 'p2p', got {self.cp_comm_type!r}")
        if self.reference not in ("resident", "offloaded", "none"):
            raise ValueError(f"reference: 'resident', 'offloaded' or 'none', got {self.reference!r}")
        if self.engine not in ("resident", "sleep"):
            raise ValueError(f"engine: 'resident' or 'sleep', got {self.engine!r}")
        if self.encode_group not in ("cp", "tp_cp"):
            raise ValueError(f"encode_group: 'cp' or 'tp_cp', got {self.encode_group!r}")

    @property
    def cp(self) -> int:
        return self.ranks if self.mode.startswith("stage12") else 1

    @property
    def packed(self) -> bool:
        return self.mode == "stage12_packed"

    def vision_shards(self, vision) -> int:
        """TP ranks the vision tower is sharded over: TP for a Qwen2.5-VL tower with encode_group 'cp', else 1."""
        return self.tensor_parallel if _is_qwen(vision) and self.encode_group == "cp" else 1

    @property
    def responses_per_rank(self) -> int:
        return self.group_size // self.ranks if self.cp == 1 else self.group_size


@dataclasses.dataclass
class MemoryEstimate:
    """Bytes per rank: the static part and each phase's working memory on top of it."""

    static: float
    phases: dict
    """{phase: working bytes} for rollout, old, ref, update."""
    parts: dict = dataclasses.field(default_factory=dict)
    """{phase: {term: bytes}}: what each phase's working memory is made of (sums to ``phases``)."""

    @property
    def binding_term(self) -> str:
        """The largest term of the phase that sets the peak (what to shrink to fit more frames)."""
        terms = self.parts.get(self.peak_phase, {})
        return max(terms, key=terms.get) if terms else self.peak_phase

    @property
    def working(self) -> float:
        return max(self.phases.values())

    @property
    def peak(self) -> float:
        return self.static + self.working

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)


def _layer_saved(llm: LLMConfig, tp: int, a: int) -> float:
    """Bytes autograd keeps per token per layer outside the attention core, at ``a`` activation bytes, as
    counted on the built layer (``LiveTensorMeter`` and the saved tensors of one forward):

    * each of the two RMSNorms (:class:`~megatron_longvideo.models.norm.RMSNorm` computes in fp32): its input
      in fp32, the fp32 1/rms, the normalised input cast back, and its output (the next linear's input);
    * the QKV output (V is a view of it), the rotated q and k, the rotary cos / sin of q and of k
      (``[s, 1, 1, head_dim]`` each, whole on every TP rank) and the attention output;
    * the SwiGLU MLP as megatron-core's unfused path runs it: the fc1 output (gate and linear halves), the
      gate's silu, a copy of the linear half (``x_linear + glu_linear_offset``), and their product (the fc2
      input): five ``ffn`` widths.

    This is the local layer spec (``transformer_impl="local"``, the default and the CPU path). TransformerEngine's
    fused norms and SwiGLU should keep less; that is not measured here.
    """
    h, f, kv, d = llm.hidden_size, llm.ffn_hidden_size, llm.num_query_groups * llm.head_dim, llm.head_dim
    norms = 2 * (4 * h + 4 + 2 * a * h)
    attention = ((h + 2 * kv) + (h + kv) + h) / tp * a + 4 * d * a
    return norms + attention + 5 * f / tp * a


def _layer_transient(llm: LLMConfig, tp: int) -> float:
    """Elements per token alive at once inside one layer's forward without grad."""
    h, f, kv = llm.hidden_size, llm.ffn_hidden_size, llm.num_query_groups * llm.head_dim
    return 3 * h + max((h + 2 * kv) * 2, 3 * f) / tp


def attention_terms(llm: LLMConfig, tokens: float, *, cp: int, mode: str = "all_gather", tp: int = 1,
                    act_bytes: int = 4) -> tuple[float, float, float]:
    """Bytes per layer of the tile engine for ``tokens`` local tokens: ``(saved, forward, backward)``.

    ``saved``: what it keeps for the backward besides its output (which the layer's output projection
    keeps anyway): the fp32 lse, and the gathered K/V (all_gather), this rank's stacked K/V block (p2p)
    or the head-sharded q/k/v/out (a2a). ``forward`` / ``backward``: the working memory on top while the
    forward runs (fp32 output accumulator, one tile's output, the gather buffers or travelling K/V
    blocks) or the backward runs (fp32 dq/dk/dv accumulators, one tile's gradients, the dK/dV
    accumulators travelling the ring, the all-to-all of the gradients). Per local token, with H and K
    the query and K/V widths per TP rank and a the activation bytes; measured against
    ``megatron_longvideo.memory_meter`` on one layer at CP 1/2/4, fp32 and bf16 (within 25%; gloo's
    buffer lifetimes make the a2a / p2p measurement itself vary by up to about 20%).
    """
    heads = llm.num_attention_heads / tp
    H = heads * llm.head_dim
    groups = llm.num_query_groups / tp
    K = groups * llm.head_dim
    a, lse = act_bytes, 4 * heads
    acc, tile = 4 * H + lse, a * H + lse  # fp32 output accumulator + lse; the largest tile's output
    if cp == 1:
        mode = "all_gather"
    if mode == "all_gather":
        saved = (cp * 2 * K * a if cp > 1 else 0) + lse
        forward = max(acc + tile, cp * K * a)  # tiles, or the gather's buffers
        backward = 4 * H + cp * 2 * K * 4 + a * H + cp * 2 * K * a
    elif mode == "p2p":
        saved = 2 * K * a + lse
        forward = acc + tile + 2 * K * a * (2 if cp > 2 else 1)  # the arriving block (and the one in use)
        # fp32 dK/dV: this step's, the previous step's still being sent, the next one arriving; and the
        # travelling K/V blocks (one at CP=2, where the last step receives nothing)
        backward = 4 * H + 3 * 2 * K * 4 + (1 if cp == 2 else 2) * 2 * K * a + a * H + 2 * K * a
    elif mode == "a2a":
        if heads != int(heads) or int(heads) % cp:
            raise ValueError(f"cp_comm_type='a2a' splits heads over CP: {heads:g} heads per TP rank are not "
                             f"divisible by context_parallel_size={cp}")
        rep = 1
        while (groups * rep) % cp:  # KV groups repeated until CP divides them
            rep += 1
        K2 = K * rep
        saved = (2 * H + 2 * K2) * a + lse
        # tiles; plus K/V repeated for CP before their all-to-all
        forward = acc + tile + (2 * K2 * a if rep > 1 else 0)
        backward = 4 * H + 2 * K2 * 4 + a * H + 2 * K2 * a + a * H
    else:
        raise ValueError(f"mode: 'all_gather', 'a2a' or 'p2p', got {mode!r}")
    return saved * tokens, forward * tokens, backward * tokens


def _vision_terms(vision, frames: int, image_size: Optional[int], encode_group: int, act_bytes: float,
                  dense: bool, prompts: int, shards: int = 1) -> tuple[int, float, float]:
    """(video tokens, raw frame bytes, the tower's activations of one layer on this rank's share).
    ``shards``: TP ranks a Qwen2.5-VL tower is sharded over (q/k/v, attention and the SwiGLU widths divide
    by it; the residual stream does not)."""
    a = act_bytes
    if _is_qwen(vision):
        if image_size is None:
            raise ValueError("image_size: the Qwen2.5-VL tower takes frames of any size; say which (pixels per side)")
        side = image_size // vision.patch_size
        units = -(-frames // vision.temporal_patch_size)  # temporal patches, split over the encode group
        tokens = units * side * side // vision.merge_unit
        local = -(-units // encode_group) * side * side  # patches this rank encodes
        vit = local * (vision.hidden_size + (3 * vision.hidden_size + 2 * vision.intermediate_size) / shards) * a
        if dense:
            window = min(side, vision.window_size // vision.patch_size) ** 2
            vit += local * vision.num_heads / shards * window * a * 2
        return tokens, frames * 3 * image_size**2 * 4 * prompts, vit
    vis_frames = -(-frames // encode_group)
    patches = vision.grid**2 + 1
    vit = vis_frames * patches * (4 * vision.hidden_size + vision.ffn_hidden_size) * a
    if dense:
        vit += vis_frames * vision.num_attention_heads * patches**2 * a * 2
    return vision.num_video_tokens(frames), frames * 3 * vision.image_size**2 * 4 * prompts, vit


def predict_step_memory(llm: LLMConfig, vision: VisionConfig, frames: int, layout: StepLayout,
                        image_size: Optional[int] = None) -> MemoryEstimate:
    """Predicted per-rank memory of one GRPO step (see module docstring). ``vision`` is the SigLIP
    family's ``VisionConfig`` or a Qwen2.5-VL ``QwenVisionConfig``; the latter needs ``image_size``
    (square frames of that many pixels per side, a multiple of 28)."""
    L, h, V = layout, llm.hidden_size, llm.vocab_size
    tp, cp, n = L.tensor_parallel, L.cp, L.ranks
    heads = llm.num_attention_heads / tp
    kv_dim = llm.num_query_groups * llm.head_dim / tp
    a = L.act_bytes

    # static
    p_llm, p_vis = llm_param_count(llm) / tp, vision_param_count(vision, h, tensor_parallel=L.vision_shards(vision))
    optim_shards = n if L.distributed_optimizer else 1
    static = p_llm * (L.param_bytes + L.grad_bytes + L.optimizer_bytes / optim_shards) + p_vis * L.param_bytes
    if L.reference == "resident":
        static += (p_llm + p_vis) * L.param_bytes
    engine_weights = llm_param_count(llm) * L.engine_bytes
    if L.engine == "resident":
        static += engine_weights

    # sequence shapes
    encode_group = 1 if L.mode == "baseline" else n * (tp if L.encode_group == "tp_cp" else 1)
    video, frame_bytes, vit = _vision_terms(vision, frames, image_size, encode_group, a, L.attention == "dense", L.prompts,
                                            L.vision_shards(vision))
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
    # vision: the frames this rank encodes, one ViT layer's activations at a time (no grad)
    encode = frame_bytes + vit + embeds

    # attention core, per layer: (saved for backward, transient on top while it runs)
    if L.attention == "engine":
        attn_saved, attn_forward, attn_backward = attention_terms(llm, tokens, cp=cp, mode=L.cp_comm_type, tp=tp,
                                                                  act_bytes=a)
        attn_forward += attn_saved  # without grad nothing is kept, but the gathered K/V live while it runs
    else:
        # scores of local queries against the whole row ([b, heads, s/cp, s], fp32): the softmax output
        # is saved; two more such tensors live while a layer runs forward (scores, masked scores) or
        # backward (gradients of the probabilities and of the scores); keys and values are gathered
        # and expanded to every query head
        scores = rows * heads * (row_len / cp) * row_len * 4
        keys = rows * row_len * 2 * (heads * llm.head_dim + kv_dim) * a
        attn_saved, attn_forward, attn_backward = scores + keys, 2 * scores + keys, 2 * scores

    vocab = targets * V / tp * 4 * 3  # logits at the targets, log-softmax, its gradient (fp32)
    layer_saved = tokens * _layer_saved(llm, tp, a)

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

    # the video's embeddings live through every pass: held by the cache (stage 1 on), or re-encoded by the pass
    # itself (baseline). That encode runs without grad before the pass's LLM forward, so its tower's activations
    # count only where they exceed the LLM's working memory
    passes = {"video embeddings": embeds, "frames": frame_bytes}
    llm_terms = ("layer activations", "attention", "vocabulary at the targets")

    def reencoded(phase: dict) -> dict:
        if L.mode == "baseline":
            phase["tower activations (re-encode)"] = max(0.0, vit - sum(phase[k] for k in llm_terms))
        return phase

    old = reencoded(dict(passes, **{"layer activations": tokens * (_layer_transient(llm, tp) + h) * a,
                                    "attention": attn_forward, "vocabulary at the targets": vocab}))
    ref = dict(old, **{"reference weights": (p_llm + p_vis) * L.param_bytes if L.reference == "offloaded" else 0.0})
    if L.recompute:  # every layer's input, and one layer recomputed at a time
        saved_act = tokens * h * a * llm.num_layers + layer_saved
        attn_update = attn_saved + max(attn_forward, attn_backward)
    else:
        saved_act = llm.num_layers * layer_saved
        attn_update = llm.num_layers * attn_saved + max(attn_forward, attn_backward)
    update = reencoded(dict(passes, **{"layer activations": saved_act + tokens * h * a * 2, "attention": attn_update,
                                       "vocabulary at the targets": vocab}))
    parts = {"rollout": {"encode": encode, "engine KV cache": kv_cache, "engine prefill": engine_act,
                         "engine weights": 0.0 if L.engine == "resident" else engine_weights},
             "old": old, "update": update}
    if L.reference != "none":
        parts["ref"] = ref
    return MemoryEstimate(static=static, phases={k: sum(v.values()) for k, v in parts.items()}, parts=parts)


def max_frames(llm: LLMConfig, vision: VisionConfig, layout: StepLayout, capacity_bytes: float,
               *, limit: int = 8192, image_size: Optional[int] = None) -> int:
    """The largest frame count (up to ``limit``) whose predicted peak fits ``capacity_bytes``; 0 if none."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if predict_step_memory(llm, vision, mid, layout, image_size=image_size).peak <= capacity_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo
