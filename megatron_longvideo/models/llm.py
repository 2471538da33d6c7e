"""The Qwen2-style language model, built from megatron-core's GPTModel and a layer spec of ours.

Qwen2: RMSNorm, SwiGLU MLP without biases, rotary embeddings, grouped-query attention with a bias on
Q/K/V only, untied or tied input/output embeddings. The layer spec is megatron's local one with two
slots swapped: the norms (:class:`RMSNorm`, which accepts Megatron sequence parallelism) and the core
attention, one of :data:`CORE_ATTENTIONS`:

* ``"engine"`` (default): :class:`~megatron_longvideo.attention.core.TileCoreAttention`, exact
  attention by tiles on fused kernels for every CP mode and for shared-prefix packing;
* ``"te"``: TransformerEngine's ``TEDotProductAttention`` (needs TE; its own CP). Plain causal rows
  only: a packed layout is refused (:func:`check_layout_supported`);
* ``"megatron"``: megatron-core's local ``DotProductAttention`` (dense scores, no CP, no packing), kept
  as a reference.

``transformer_impl`` (Megatron's ``--transformer-impl``): ``"local"`` (megatron-core's own linears and
our RMSNorm, the default, and the only one on CPU) or ``"transformer_engine"`` (TE's layer spec: fused
norm + linear modules, with the core attention above still in its slot, so packing and every CP mode
stay exact). Models are built on the CPU (megatron's ``use_cpu_initialization``, identical weights for
every layout) and moved to the rank's compute device once. ``params_dtype=torch.bfloat16`` /
``torch.float16`` builds a 16-bit model (megatron's ``bf16`` / ``fp16``; wrap it with
:func:`megatron_longvideo.training.engine.mixed_precision`, which DDP wrapping does).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_longvideo.parallel.context import SequenceContext
from megatron_longvideo.parallel.groups import ParallelConfig, ParallelGroups
from megatron_longvideo.platform.device import to_compute_device

__all__ = ["LLMConfig", "CORE_ATTENTIONS", "TRANSFORMER_IMPLS", "transformer_config", "qwen2_layer_spec", "qwen2_block_spec", "build_llm",
           "enable_recompute", "lm_forward", "unwrap", "check_layout_supported"]

CORE_ATTENTIONS = ("engine", "te", "megatron")
TRANSFORMER_IMPLS = ("local", "transformer_engine")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LLMConfig:
    """Shape of a Qwen2-style decoder."""

    vocab_size: int = 1024
    """Vocabulary size (padded to a multiple of the TP size by the caller if needed)."""
    hidden_size: int = 64
    """Model width."""
    num_layers: int = 2
    """Number of transformer layers."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int = 2
    """Key/value heads (grouped-query attention); equal to the heads for plain multi-head attention."""
    ffn_hidden_size: int = 128
    """SwiGLU inner width."""
    max_position_embeddings: int = 32768
    """Longest sequence the rotary embedding is meant for."""
    rotary_base: float = 10000.0
    """RoPE base (Qwen2: 1e6)."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output layer."""
    init_std: float = 0.02
    """Weight init standard deviation."""
    mrope_section: Optional[tuple[int, int, int]] = None
    """Multimodal RoPE (Qwen2-VL / Qwen2.5-VL): how many of the ``head_dim / 2`` rotary frequencies
    follow the temporal, height and width position rows (Qwen2.5-VL-7B: (16, 24, 24)); positions are then
    ``[3, b, s]``. None: plain RoPE."""

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "ffn_hidden_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        if self.mrope_section is not None:
            section = tuple(int(x) for x in self.mrope_section)
            if len(section) != 3 or sum(section) * 2 != self.head_dim:
                raise ValueError(f"mrope_section={self.mrope_section}: expected 3 sizes summing to head_dim / 2 = "
                                 f"{self.head_dim // 2}")
            object.__setattr__(self, "mrope_section", section)  # a tuple, also when read back from JSON
        if self.num_attention_heads % self.num_query_groups != 0:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by num_query_groups={self.num_query_groups}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def tiny(cls, **overrides) -> "LLMConfig":
        """A model that runs forward+backward on CPU in milliseconds (tests and the demo)."""
        return cls(**overrides)

    @classmethod
    def qwen2_7b(cls, **overrides) -> "LLMConfig":
        """The shape of Qwen2-7B (described, not run on CPU)."""
        base = dict(vocab_size=152064, hidden_size=3584, num_layers=28, num_attention_heads=28, num_query_groups=4,
                    ffn_hidden_size=18944, max_position_embeddings=131072, rotary_base=1e6, norm_eps=1e-6)
        base.update(overrides)
        return cls(**base)


def transformer_config(llm: LLMConfig, parallel: ParallelConfig, *, params_dtype=torch.float32, **overrides):
    """megatron-core ``TransformerConfig`` for ``llm`` under ``parallel``."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=llm.num_layers,
        hidden_size=llm.hidden_size,
        num_attention_heads=llm.num_attention_heads,
        num_query_groups=llm.num_query_groups,
        ffn_hidden_size=llm.ffn_hidden_size,
        kv_channels=llm.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=llm.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=llm.init_std,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=parallel.tensor_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        cp_comm_type=parallel.cp_comm_type,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=True,
        calculate_per_token_loss=True,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def qwen2_layer_spec(sequence_context: SequenceContext, *, core_attention: str = "engine", attention_kernel: str = "auto",
                     transformer_impl: str = "local", use_te: bool = False):
    """Megatron layer spec for a Qwen2 layer (see module docstring for ``core_attention`` and
    ``transformer_impl``; ``use_te=True`` is ``transformer_impl="transformer_engine"``).

    ``attention_kernel``: the tile engine's kernel backend (``"auto"``; see
    :func:`megatron_longvideo.attention.backends.get_backend`).
    """
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_longvideo.attention.core import TileCoreAttention

    if core_attention not in CORE_ATTENTIONS:
        raise ValueError(f"core_attention must be one of {CORE_ATTENTIONS}, got {core_attention!r}")
    if use_te:
        transformer_impl = "transformer_engine"
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"transformer_impl must be one of {TRANSFORMER_IMPLS}, got {transformer_impl!r}")
    if transformer_impl == "transformer_engine":
        _require_te("transformer_impl='transformer_engine' (--transformer-impl transformer_engine)")
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        # TE's fused norm + linear modules; its core attention is replaced below unless asked for
        spec = get_gpt_layer_with_transformer_engine_spec()
        sub = spec.submodules
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        from megatron_longvideo.models.norm import RMSNorm

        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        sub = spec.submodules
        sub.input_layernorm = RMSNorm
        sub.pre_mlp_layernorm = RMSNorm
    sub.self_attention.params = {"attn_mask_type": AttnMaskType.causal}
    if core_attention == "engine":
        sub.self_attention.submodules.core_attention = functools.partial(
            TileCoreAttention, sequence_context=sequence_context, kernel=attention_kernel)
    elif core_attention == "te":
        _require_te("core_attention='te' (--core-attention te)")
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        sub.self_attention.submodules.core_attention = TEDotProductAttention
    else:
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        sub.self_attention.submodules.core_attention = DotProductAttention
    return spec


def _require_te(what: str) -> None:
    try:
        import transformer_engine  # noqa: F401
    except ImportError as err:
        raise ImportError(f"{what} needs TransformerEngine: pip install 'megatron_longvideo[gpu]' on a CUDA machine, "
                          f"or use the default core_attention='engine'") from err


def check_layout_supported(core_attention: str, *, packed: bool) -> None:
    """Raise ValueError when ``core_attention`` cannot express a ``packed`` layout.

    TransformerEngine's and megatron's attentions see plain causal rows only: a shared-prefix packed
    layout (segment ids, or a layout with rows) would be attended as one causal sequence, silently
    wrong, so it is refused.
    """
    if packed and core_attention != "engine":
        raise ValueError(
            f"core_attention={core_attention!r} (--core-attention {core_attention}) attends plain causal rows only; "
            f"this forward is packed (segment ids: shared-prefix packing). Use --core-attention engine, or turn "
            f"packing off (--no-pack)"
        )


def qwen2_block_spec(config, sequence_context: SequenceContext, *, pp_rank: int = 0, core_attention: str = "engine",
                     attention_kernel: str = "auto", transformer_impl: str = "local"):
    """Block spec: this pipeline stage's Qwen2 layers and a final RMSNorm that accepts sequence
    parallelism (megatron's default final norm for a layer spec is the TP-only torch norm; with TE,
    TE's norm)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    num_layers = get_num_layers_to_build(config, vp_stage=None, pp_rank=pp_rank)
    layer = qwen2_layer_spec(sequence_context, core_attention=core_attention, attention_kernel=attention_kernel,
                             transformer_impl=transformer_impl)
    if transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        from megatron_longvideo.models.norm import RMSNorm as final_norm
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm)


def build_llm(
    llm: LLMConfig,
    groups: ParallelGroups,
    *,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    params_dtype=torch.float32,
    core_attention: str = "engine",
    attention_kernel: str = "auto",
    transformer_impl: str = "local",
    recompute_activations: bool = False,
    device=None,
    **config_overrides,
):
    """Build the Qwen2-style GPTModel for this rank's pipeline stage.

    Returns the model; its :class:`SequenceContext` is ``model.sequence_context``. The rotary
    module reads explicit positions from it (see :mod:`megatron_longvideo.models.rotary`).
    ``core_attention`` / ``attention_kernel`` / ``transformer_impl``: see the module docstring and
    :func:`qwen2_layer_spec`. ``recompute_activations``: see :func:`enable_recompute`. ``device``: where
    the model lives (default: the rank's compute device, :func:`~megatron_longvideo.platform.device.compute_device`).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: F401  (spec type)

    from megatron_longvideo.models.rotary import PositionRotaryEmbedding

    parallel = groups.config
    parallel.check_model(num_attention_heads=llm.num_attention_heads, num_query_groups=llm.num_query_groups)
    if config_overrides.get("recompute_granularity") is not None:
        raise ValueError(
            "recompute_granularity: megatron's own recompute re-runs layers after the forward's SequenceContext "
            "(packed segments, positions) is gone, so a packed batch would be recomputed as plain causal; use "
            "recompute_activations=True (--recompute-activations), which captures it"
        )
    if llm.vocab_size % parallel.tensor_parallel_size != 0:
        raise ValueError(f"vocab_size={llm.vocab_size} is not divisible by tensor_parallel_size={parallel.tensor_parallel_size}")
    config = transformer_config(llm, parallel, params_dtype=params_dtype, **config_overrides)
    context = SequenceContext()
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage() if parallel.pipeline_parallel_size > 1 else True
    if post_process is None:
        post_process = ps.is_pipeline_last_stage() if parallel.pipeline_parallel_size > 1 else True
    model = GPTModel(
        config=config,
        transformer_layer_spec=qwen2_block_spec(config, context, pp_rank=groups.rank(groups.pp), core_attention=core_attention,
                                                attention_kernel=attention_kernel, transformer_impl=transformer_impl),
        vocab_size=llm.vocab_size,
        max_sequence_length=llm.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=llm.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=llm.rotary_base,
        pg_collection=groups.pg_collection,
    )
    model.rotary_pos_emb = PositionRotaryEmbedding(
        kv_channels=config.kv_channels,
        rotary_percent=1.0,
        rotary_interleaved=config.rotary_interleaved,
        rotary_base=llm.rotary_base,
        use_cpu_initialization=True,
        cp_group=groups.cp,
        sequence_context=context,
        mrope_section=llm.mrope_section,
    )
    model.sequence_context = context
    model.cfg = llm  # recorded in checkpoints, so converters can rebuild the model
    model.core_attention_kind = core_attention
    if recompute_activations:
        enable_recompute(model)
    return to_compute_device(model, device)


def enable_recompute(model) -> None:
    """Full activation recompute, one transformer layer at a time.

    Under grad mode each layer keeps only its input for backward and runs its forward again there,
    trading one extra forward of the layers for activation memory that no longer grows with depth
    (what long sequences need). The layer's :class:`SequenceContext` (positions, packed segments) is
    captured at forward time and set again for the recompute, so packing and CP sharding stay exact.
    Non-reentrant ``torch.utils.checkpoint``; dropout inside the layers must be 0 (our configs).
    Megatron's own ``recompute_granularity`` is not used: its re-entrant recompute would run the
    layers after the context was reset.
    """
    from torch.utils.checkpoint import checkpoint

    inner = unwrap(model)
    context = inner.sequence_context
    for layer in inner.decoder.layers:
        if getattr(layer, "_mlv_recompute", False):
            continue
        forward = layer.forward

        def recomputed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            captured = context.state()

            def run(*a, **k):
                with context.use(**captured):
                    return _forward(*a, **k)

            return checkpoint(run, *args, use_reentrant=False, **kwargs)

        layer.forward = recomputed
        layer._mlv_recompute = True


def unwrap(model):
    """The GPTModel (or other megatron module) inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def lm_forward(
    model,
    *,
    input_ids: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    decoder_input: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    segment_ids: Optional[torch.Tensor] = None,
    layout=None,
):
    """Run the (possibly DDP-wrapped) LM on this rank's tokens with explicit positions.

    ``input_ids``/``position_ids``/``labels``/``segment_ids`` are ``[b, s_local]`` (this CP rank's
    shard); ``decoder_input`` ``[s_local, b, h]`` replaces the embedding lookup (merged video+text
    embeddings). With ``labels`` the result is the per-token loss ``[b, s_local]``; else logits
    (``[b, s_local, vocab / tp]``) or, on non-last pipeline stages, the hidden states. ``layout``: the
    batch's :class:`~megatron_longvideo.attention.layout.SequenceLayout` (global, host-side), which
    saves the attention deriving it from ``segment_ids``.
    """
    inner = unwrap(model)
    kind = getattr(getattr(inner, "llm", inner), "core_attention_kind", "engine")
    check_layout_supported(kind, packed=segment_ids is not None or (layout is not None and layout.rows is not None))
    context = inner.sequence_context
    with context.use(position_ids=position_ids, segment_ids=segment_ids, layout=layout):
        return model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=None,
            decoder_input=decoder_input,
            labels=labels,
        )
