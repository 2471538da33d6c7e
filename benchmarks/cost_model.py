"""FLOPs of a vision tower per frame and of an LLM per token; CPU models scaled to a 7B model's ratios.

A benchmark on a tiny CPU model says something about a 7B system only if the tiny model spends its work
in the same proportions. Two numbers set where a GRPO step on long videos spends it:

* **tokens per frame** (what a frame costs the LLM in sequence length), and
* **ratio** = vision FLOPs per frame / LLM FLOPs per token (how many LLM tokens of work one frame's
  encoding costs; what stage 1, parallel encoding and the cache, can save is set by it).

:func:`cost_matched` picks a CPU model (LLM, tower, frame size) with the tokens per frame of a 7B reference
exactly and its ratio within ``tolerance``, choosing the cheapest LLM for which a tower fits.

That match is exact at short prompts but not at long ones: the LLM's attention per token grows with the
context as ``S h`` against the matmuls' ``h^2``, so a 64-wide CPU LLM at a 7B's tokens per frame has 54x the
7B's ratio of attention to matmul FLOPs at the same frame count (at 1,024 frames the 7B's LLM spends 3.1x its
matmul FLOPs on attention, the 196-token CPU match 167x), and its vision share of the step is 40x too small. A step's split of its work between the tower, the LLM's matmuls and the LLM's attention is
set by two per-frame numbers, which :func:`split_matched` ("``<name>-split``") matches instead:

* **frame ratio** = vision FLOPs per frame / (tokens per frame x LLM matmul FLOPs per token): the tower
  against the LLM matmuls per frame of video;
* **attention per frame** = ``2 L t h`` / LLM matmul FLOPs per token (``t`` tokens per frame): the LLM's
  causal attention over a prompt of ``F`` frames, averaged per token, is ``F`` times this the matmuls'.

Both held within ``tolerance``, the CPU model spends its step as the 7B does at every frame count (up to the
text and the responses, 1-2% of either prompt), with a few tokens per frame, so 4,096 frames are a
16k-18k-token prompt that two CPU cores run in a minute.

FLOP counts (one forward; a multiply-add is 2 FLOPs; norms, activations, biases, softmax and RoPE are left
out, they are O(width) per token against O(width^2)):

* a matmul of an ``[n, a]`` input by an ``[a, b]`` weight: ``2 n a b``;
* attention of ``n`` queries over ``k`` keys with query width ``d_q`` (heads x head dim): ``4 n k d_q``
  (``Q K^T`` and ``P V``, 2 each).

LLM (Qwen2 layers: q/k/v with GQA, output projection, SwiGLU), per token, ``h`` hidden, ``kv`` = KV
heads x head dim, ``f`` SwiGLU width, ``L`` layers:

    matmul = 2 L (h (h + 2 kv) + h h + 3 h f)             # = 2 x the layers' weight count
    attention(s) = 4 L s h                                 # the token at position s (causal: s keys)
    head = 2 h V                                           # output layer, only where logits are taken

Averaged over a causal prompt of ``S`` tokens the attention term is ``2 L S h`` per token. The ratio uses
``matmul`` alone (no context, no head: a prompt's video tokens take no logits); :func:`llm_flops_per_token`
gives the attention term at a context too, and the report prints the ratio at the frame counts measured.

SigLIP tower (LLaVA-OneVision family), per frame, ``n = (image / patch)^2`` patches, width ``w``, MLP ``f``,
``D`` layers, LLM width ``h``:

    patch embedding = 2 n (3 p^2) w
    layers = D (2 n (4 w^2 + 2 w f) + 4 n^2 w)            # full bidirectional attention in the frame
    projector = 2 n (w h + h h)                           # Linear-GELU-Linear, before the bilinear pooling

Qwen2.5-VL tower, per temporal patch of ``t_p = 2`` frames (the per-frame cost is half), ``n`` patches of
the frame grid, width ``c``, SwiGLU ``f``, window ``m`` patches (``(window / patch)^2``), ``D`` layers of
which ``D_full`` attend over the whole temporal patch:

    patch embedding = 2 n (3 t_p p^2) c
    layers = D 2 n (4 c^2 + 3 c f) + (D - D_full) 4 n m c + D_full 4 n^2 c
    merger = 2 (n / 4) ((4 c)^2 + 4 c h)                    # 2x2 merge blocks -> LLM width

    python benchmarks/cost_model.py          # the 7B references' ratios and the matched CPU models
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Optional

__all__ = ["Reference", "MatchedModel", "llm_flops_per_token", "vision_flops_per_frame", "tokens_per_frame",
           "ratio", "frame_ratio", "attention_per_frame", "vision_share", "llava_onevision_7b", "qwen2_5_vl_7b_llm", "qwen2_5_vl_7b_vision", "qwen2_5_vl_7b", "REFERENCES",
           "cost_matched", "split_matched", "matched", "MATCH_NAMES", "TOLERANCE", "report"]

TOLERANCE = 0.05
"""Relative tolerance on the ratio of a matched CPU model (the tokens per frame match exactly)."""


def _is_qwen(vision) -> bool:
    return hasattr(vision, "temporal_patch_size")


def llm_flops_per_token(llm, *, context: float = 0.0, head: bool = False) -> float:
    """Forward FLOPs of one token of the Qwen2-style ``llm`` (module docstring): the layers' matmuls, plus
    the attention over ``context`` keys, plus the output layer with ``head``."""
    h, f, L = llm.hidden_size, llm.ffn_hidden_size, llm.num_layers
    kv = llm.num_query_groups * llm.head_dim
    flops = 2 * L * (h * (h + 2 * kv) + h * h + 3 * h * f)
    flops += 4 * L * context * h
    if head:
        flops += 2 * h * llm.vocab_size
    return float(flops)


def vision_flops_per_frame(vision, llm_hidden: int, *, image_size: Optional[int] = None) -> float:
    """Forward FLOPs of encoding one frame (module docstring): a SigLIP-family ``VisionConfig`` (its own
    ``image_size``) or a Qwen2.5-VL ``QwenVisionConfig`` on square frames of ``image_size`` pixels."""
    if _is_qwen(vision):
        if image_size is None:
            raise ValueError("image_size: the Qwen2.5-VL tower takes frames of any size; say which")
        c, f, p, tp = vision.hidden_size, vision.intermediate_size, vision.patch_size, vision.temporal_patch_size
        n = (image_size // p) ** 2  # patches of one temporal patch
        m = min(image_size // p, vision.window_size // p) ** 2  # patches of one (full) window
        full = len(vision.fullatt_block_indexes)
        u = vision.merge_unit
        flops = 2 * n * (3 * tp * p * p) * c
        flops += vision.depth * 2 * n * (4 * c * c + 3 * c * f)
        flops += (vision.depth - full) * 4 * n * m * c + full * 4 * n * n * c
        flops += 2 * (n // u) * ((u * c) ** 2 + u * c * llm_hidden)
        return flops / tp
    w, f, p = vision.hidden_size, vision.ffn_hidden_size, vision.patch_size
    n = vision.grid ** 2
    proj_in = w * (4 if vision.pooling == "merge2x2" else 1)
    proj_tokens = n // 4 if vision.pooling == "merge2x2" else n
    flops = 2 * n * (3 * p * p) * w
    flops += vision.num_layers * (2 * n * (4 * w * w + 2 * w * f) + 4 * n * n * w)
    flops += 2 * proj_tokens * (proj_in * llm_hidden + llm_hidden * llm_hidden)
    return float(flops)


def tokens_per_frame(vision, *, image_size: Optional[int] = None) -> float:
    """LLM tokens one frame takes (Qwen2.5-VL: a temporal patch's tokens / its 2 frames)."""
    if _is_qwen(vision):
        side = image_size // vision.patch_size
        return side * side / vision.merge_unit / vision.temporal_patch_size
    return float(vision.tokens_per_frame)


def ratio(llm, vision, *, image_size: Optional[int] = None, context: float = 0.0) -> float:
    """Vision FLOPs per frame / LLM FLOPs per token (``context``: with the attention over that many keys)."""
    return vision_flops_per_frame(vision, llm.hidden_size, image_size=image_size) / llm_flops_per_token(llm, context=context)


def frame_ratio(llm, vision, *, image_size: Optional[int] = None) -> float:
    """Vision FLOPs per frame / the LLM's matmul FLOPs over that frame's tokens (module docstring)."""
    return ratio(llm, vision, image_size=image_size) / tokens_per_frame(vision, image_size=image_size)


def attention_per_frame(llm, vision, *, image_size: Optional[int] = None) -> float:
    """The LLM's causal attention over a prompt of one frame more, averaged per token, over its matmul FLOPs per
    token: ``2 L t h / matmul`` (a prompt of ``F`` frames: ``F`` times this)."""
    t = tokens_per_frame(vision, image_size=image_size)
    return 2 * llm.num_layers * t * llm.hidden_size / llm_flops_per_token(llm)


def vision_share(llm, vision, frames: int, *, image_size: Optional[int] = None, text_len: int = 64) -> float:
    """The tower's share of a prompt's forward FLOPs at ``frames`` frames (the LLM with its causal attention)."""
    t = tokens_per_frame(vision, image_size=image_size)
    tokens = frames * t + text_len
    llm_total = tokens * llm_flops_per_token(llm, context=tokens / 2)
    vis = frames * vision_flops_per_frame(vision, llm.hidden_size, image_size=image_size)
    return vis / (vis + llm_total)


# -- the 7B references ---------------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class Reference:
    """A published model's shape: its LLM, tower and frame size."""

    name: str
    family: str
    """'llava_onevision' or 'qwen2_5_vl'."""
    llm: object
    vision: object
    image_size: int

    @property
    def tokens_per_frame(self) -> float:
        return tokens_per_frame(self.vision, image_size=self.image_size)

    @property
    def ratio(self) -> float:
        return ratio(self.llm, self.vision, image_size=self.image_size)


def llava_onevision_7b() -> Reference:
    """LLaVA-OneVision-7B: Qwen2-7B + SigLIP-so400m/14 at 384 px, bilinear pooling 27x27 -> 14x14 (196 tokens
    per frame); the library's ``VLMConfig.seven_b()``."""
    from megatron_longvideo.models.llava_onevision.model import VLMConfig

    cfg = VLMConfig.seven_b()
    return Reference("LLaVA-OneVision-7B", "llava_onevision", cfg.llm, cfg.vision, cfg.vision.image_size)


def qwen2_5_vl_7b_llm():
    """Qwen2.5-VL-7B's LLM (Qwen2.5-7B): hidden 3584, 28 layers, 28 heads, 4 KV heads, SwiGLU 18944, vocabulary
    152064, multimodal RoPE sections (16, 24, 24), from its published config.json. transformers'
    ``Qwen2_5_VLConfig()`` defaults are a larger model's (text hidden 8192, 64 heads, 8 KV heads); only the
    vocabulary is shared."""
    from megatron_longvideo.models.llm import LLMConfig

    return LLMConfig(vocab_size=152064, hidden_size=3584, num_layers=28, num_attention_heads=28, num_query_groups=4,
                     ffn_hidden_size=18944, max_position_embeddings=128000, rotary_base=1e6, mrope_section=(16, 24, 24))


def qwen2_5_vl_7b_vision():
    """Qwen2.5-VL-7B's ViT: depth 32, hidden 1280, 16 heads, SwiGLU 3420, patch 14, temporal patch 2, spatial
    merge 2, window 112 px, full attention in blocks 7, 15, 23, 31, merger to 3584. transformers'
    ``Qwen2_5_VLVisionConfig()`` defaults agree on all of these but the width (its default ``hidden_size`` is
    3584, the LLM's; the 7B checkpoint's config.json says 1280): ``tests/benchmarks/test_cost_model.py``
    checks the rest against them."""
    from megatron_longvideo.models.qwen2_5_vl.vision import QwenVisionConfig

    return QwenVisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                            patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                            fullatt_block_indexes=(7, 15, 23, 31), freeze=True)


def qwen2_5_vl_7b(image_size: int = 448) -> Reference:
    """Qwen2.5-VL-7B on square frames of ``image_size`` px (448: 32x32 patches, 128 tokens per frame; the
    capacity tables of docs/performance.md use 448 and 224)."""
    return Reference(f"Qwen2.5-VL-7B ({image_size} px)", "qwen2_5_vl", qwen2_5_vl_7b_llm(), qwen2_5_vl_7b_vision(), image_size)


REFERENCES = {"llava": llava_onevision_7b, "qwen": qwen2_5_vl_7b}
"""``--cost-match`` names -> the reference they scale down."""


# -- scaled-down CPU models ----------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class MatchedModel:
    """A CPU model with a reference's tokens per frame and (within tolerance) its ratio."""

    reference: Reference
    llm: object
    vision: object
    image_size: int
    criterion: str = "tokens"
    """'tokens': the reference's tokens per frame and ratio (:func:`cost_matched`); 'split': its frame ratio
    and attention per frame (:func:`split_matched`)."""

    @property
    def tokens_per_frame(self) -> float:
        return tokens_per_frame(self.vision, image_size=self.image_size)

    @property
    def ratio(self) -> float:
        return ratio(self.llm, self.vision, image_size=self.image_size)

    @property
    def ratio_error(self) -> float:
        """(ours - reference) / reference."""
        return self.ratio / self.reference.ratio - 1.0

    @property
    def frame_ratio_error(self) -> float:
        ref = self.reference
        return frame_ratio(self.llm, self.vision, image_size=self.image_size) / frame_ratio(ref.llm, ref.vision, image_size=ref.image_size) - 1.0

    @property
    def attention_error(self) -> float:
        ref = self.reference
        mine = attention_per_frame(self.llm, self.vision, image_size=self.image_size)
        return mine / attention_per_frame(ref.llm, ref.vision, image_size=ref.image_size) - 1.0

    def describe(self) -> str:
        v, l = self.vision, self.llm
        if _is_qwen(v):
            tower = (f"ViT {v.depth} x {v.hidden_size} (SwiGLU {v.intermediate_size}, {v.num_heads} heads, full attention in "
                     f"{list(v.fullatt_block_indexes)}), patch {v.patch_size}, window {v.window_size} px")
        else:
            tower = f"ViT {v.num_layers} x {v.hidden_size} (MLP {v.ffn_hidden_size}, {v.num_attention_heads} heads), patch {v.patch_size}"
        return (f"LLM {l.num_layers} x {l.hidden_size} (SwiGLU {l.ffn_hidden_size}, {l.num_attention_heads} heads, "
                f"{l.num_query_groups} KV), {tower}, {self.image_size} px frames")


def _cpu_llm(hidden: int, layers: int, vocab_size: int, mrope: bool):
    from megatron_longvideo.models.llm import LLMConfig

    heads, groups = 4, 2
    head_dim = hidden // heads
    # SwiGLU / hidden as Qwen2-7B (18944 / 3584 = 5.29), rounded to a multiple of 16
    ffn = max(16, int(round(hidden * 18944 / 3584 / 16)) * 16)
    section = None
    if mrope:  # Qwen2.5-VL's (16, 24, 24) of head_dim 128, scaled: 1/8, 3/16, 3/16 of the head dim
        t = head_dim // 8
        rest = head_dim // 2 - t
        section = (t, rest - rest // 2, rest // 2)
    return LLMConfig(vocab_size=vocab_size, hidden_size=hidden, num_layers=layers, num_attention_heads=heads,
                     num_query_groups=groups, ffn_hidden_size=ffn, mrope_section=section)


def _towers(ref: Reference, llm_hidden: int, patch_size: int, side: Optional[int] = None):
    """Candidate CPU towers of ``ref``'s family with ``side`` patches per frame side (default the reference's, so
    its tokens per frame): (vision config, image size)."""
    widths = (8, 16, 24, 32, 48, 64, 96, 128)
    depths = (1, 2, 3, 4, 5, 6, 7, 8)
    if ref.family == "qwen2_5_vl":
        from megatron_longvideo.models.qwen2_5_vl.vision import QwenVisionConfig

        rv = ref.vision
        side = side or ref.image_size // rv.patch_size  # the reference's patches per side, kept
        window = rv.window_size // rv.patch_size * patch_size  # and its window, in patches
        for w in widths:
            for d in depths:
                # full attention every 8 layers as the 7B (7, 15, 23, 31), at least in the last layer
                full = tuple(sorted({i for i in range(7, d, 8)} | {d - 1}))
                vision = QwenVisionConfig(depth=d, hidden_size=w, intermediate_size=max(8, int(round(w * 3420 / 1280 / 4)) * 4),
                                          num_heads=max(1, w // 16), out_hidden_size=llm_hidden, patch_size=patch_size,
                                          temporal_patch_size=2, spatial_merge_size=2, window_size=window,
                                          fullatt_block_indexes=full, freeze=True)
                yield vision, side * patch_size
        return
    from megatron_longvideo.models.llava_onevision.vision import VisionConfig

    rv = ref.vision
    side = side or rv.grid
    for w in widths:
        for d in depths:
            vision = VisionConfig(image_size=side * patch_size, patch_size=patch_size, hidden_size=w, num_layers=d,
                                  num_attention_heads=max(1, w // 16), ffn_hidden_size=int(round(w * 4304 / 1152 / 4)) * 4,
                                  pooling=rv.pooling, newline=rv.newline, freeze=True, freeze_projector=True)
            yield vision, vision.image_size


def cost_matched(name: str, *, vocab_size: int = 304, patch_size: int = 2, tolerance: float = TOLERANCE,
                 hiddens=(64, 96, 128, 192, 256, 384, 512), layers=(2, 4, 6, 8)) -> MatchedModel:
    """The cheapest CPU model (least LLM FLOPs per token, then the ratio closest to the reference's) with the
    tokens per frame of reference ``name`` ('llava' or 'qwen', :data:`REFERENCES`) and its ratio within
    ``tolerance``. The tower keeps the reference's patches per frame (so its tokens per frame) on
    ``patch_size``-pixel patches (2: frames of 54 px for SigLIP's 27 x 27 grid, 64 px for Qwen2.5-VL's 32 x 32;
    the patch embedding is < 0.2% of either 7B tower's FLOPs, and small frames keep 4,096 of them in memory).
    Raises ValueError when nothing in the search space fits."""
    if name not in REFERENCES:
        raise ValueError(f"cost match: one of {sorted(REFERENCES)}, got {name!r}")
    ref = REFERENCES[name]()

    def error(m):  # None: the tokens per frame differ
        return abs(m.ratio_error) if m.tokens_per_frame == ref.tokens_per_frame else None

    best = _cheapest(ref, "tokens", error, tolerance, vocab_size, patch_size, None, hiddens, layers)
    if best is None:
        raise ValueError(f"cost match {name!r}: no CPU model within {tolerance:.0%} of ratio {ref.ratio:.1f} in the search space")
    return best


def _cheapest(ref, criterion, error, tolerance, vocab_size, patch_size, side, hiddens, layers):
    """The search both matches share: over the CPU LLMs (``hiddens`` x ``layers``, RoPE's even head dim) and the
    towers of ``ref``'s family (``side`` patches per frame side), the model with the least LLM FLOPs per token,
    then the least ``error(model)``, among those whose error is not None and within ``tolerance``; None if none."""
    best = None
    for hidden in hiddens:
        for num_layers in layers:
            llm = _cpu_llm(hidden, num_layers, vocab_size, mrope=ref.family == "qwen2_5_vl")
            if llm.hidden_size % (2 * llm.num_attention_heads):
                continue
            for vision, image_size in _towers(ref, hidden, patch_size, side=side):
                m = MatchedModel(ref, llm, vision, image_size, criterion=criterion)
                err = error(m)
                if err is None or err > tolerance:
                    continue
                key = (llm_flops_per_token(llm), err)
                if best is None or key < best[0]:
                    best = (key, m)
    return None if best is None else best[1]


SPLIT_SIDES = {"llava": 3, "qwen": 6}
"""Patches per frame side of the split matches: SigLIP-style 3 x 3, pooled to 2 x 2 = 4 tokens per frame (odd, as
the 7B's 27 x 27); Qwen2.5-VL 6 x 6 per temporal patch, merged 2 x 2: 9 tokens per 2 frames."""

MATCH_NAMES = ("llava", "qwen", "llava-split", "qwen-split")
"""``--cost-match`` values: :func:`cost_matched` (the 7B's tokens per frame) and, with ``-split``, :func:`split_matched`."""


def split_matched(name: str, *, vocab_size: int = 304, patch_size: int = 2, side: Optional[int] = None,
                  tolerance: float = TOLERANCE, hiddens=tuple(range(32, 329, 8)), layers=(2, 3, 4)) -> MatchedModel:
    """The cheapest CPU model (least LLM FLOPs per token, then the smallest of the two errors' larger) with ``side``
    patches per frame side (default :data:`SPLIT_SIDES`) whose frame ratio and attention per frame (module
    docstring) are both within ``tolerance`` of reference ``name``'s: the model that spends a step's work between
    the tower, the LLM matmuls and the LLM attention as the 7B does, at every frame count. Raises ValueError when
    nothing in the search space fits."""
    if name not in REFERENCES:
        raise ValueError(f"split match: one of {sorted(REFERENCES)}, got {name!r}")
    ref = REFERENCES[name]()
    best = _cheapest(ref, "split", lambda m: max(abs(m.frame_ratio_error), abs(m.attention_error)), tolerance, vocab_size,
                     patch_size, side or SPLIT_SIDES[name], hiddens, layers)
    if best is None:
        raise ValueError(f"split match {name!r}: no CPU model within {tolerance:.0%} of the frame ratio and the attention "
                         "per frame in the search space")
    return best


@functools.lru_cache(maxsize=None)
def matched(name: str, *, vocab_size: int = 304) -> MatchedModel:
    """The CPU model a ``--cost-match`` value (:data:`MATCH_NAMES`) names (searched once per process: the benchmarks'
    reports ask for it per mode and frame count)."""
    if name not in MATCH_NAMES:
        raise ValueError(f"cost match: one of {list(MATCH_NAMES)}, got {name!r}")
    if name.endswith("-split"):
        return split_matched(name[: -len("-split")], vocab_size=vocab_size)
    return cost_matched(name, vocab_size=vocab_size)


def cost_table(rows, frame_counts=(1024, 4096), text_len: int = 64) -> str:
    """A markdown table of ``rows`` = (label, llm, vision, image size): tokens per frame, vision FLOPs per frame, LLM
    matmul FLOPs per token, the ratio, the frame ratio, and at each of ``frame_counts`` frames the LLM's attention
    over its matmuls and the tower's share of a prompt's forward FLOPs (what stage 1 can save is bounded by it)."""
    fc = list(frame_counts)
    lines = ["| model | tokens / frame | vision GFLOP / frame | LLM MFLOP / token | ratio | frame ratio | "
             + " | ".join(f"LLM attention / matmul, {f:,} frames" for f in fc) + " | "
             + " | ".join(f"vision share, {f:,} frames" for f in fc) + " |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * (2 * len(fc))]
    for label, llm, vision, size in rows:
        tpf = tokens_per_frame(vision, image_size=size)
        att = [attention_per_frame(llm, vision, image_size=size) * (f + text_len / tpf) for f in fc]
        share = [vision_share(llm, vision, f, image_size=size, text_len=text_len) for f in fc]
        lines.append(f"| {label} | {tpf:g} | {vision_flops_per_frame(vision, llm.hidden_size, image_size=size) / 1e9:.4g} | "
                     f"{llm_flops_per_token(llm) / 1e6:.4g} | {ratio(llm, vision, image_size=size):.1f} | "
                     f"{frame_ratio(llm, vision, image_size=size):.3f} | " + " | ".join(f"{a:.2f}" for a in att) + " | "
                     + " | ".join(f"{x:.2%}" for x in share) + " |")
    return "\n".join(lines)


def report(names=("llava", "qwen"), frame_counts=(1024, 4096), text_len: int = 64) -> str:
    """A markdown table (:func:`cost_table`): each reference, its tokens-per-frame match (:func:`cost_matched`) and
    its split match (:func:`split_matched`)."""
    rows = []
    for name in names:
        ref = REFERENCES[name]()
        rows.append((ref.name, ref.llm, ref.vision, ref.image_size))
        for tag, m in ((f"`{name}`", cost_matched(name)), (f"`{name}-split`", split_matched(name))):
            rows.append((f"CPU match {tag}: {m.describe()}", m.llm, m.vision, m.image_size))
    return cost_table(rows, frame_counts, text_len)


if __name__ == "__main__":
    print(report())
    sys.exit(0)
