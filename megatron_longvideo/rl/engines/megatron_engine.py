"""The ``megatron`` rollout engine: generation with the policy model itself, its own TP shards, no weight copy.

A few small functions over the weights of the policy's megatron modules (prefill, one decode step,
over a static per-layer KV cache), run under ``torch.no_grad``. Nothing goes through
the modules' ``forward``: under sequence parallelism a layer would reduce-scatter a one-token sequence,
and the training forward's attention, CP collectives and packing are not what decoding needs. Per layer:

* input RMSNorm; ``linear_qkv`` with this TP rank's shard (megatron's layout: per local query group
  ``[q_1 .. q_{np/ng}, k, v]``, each ``head_dim`` wide, bias likewise);
* the policy's own rotary frequencies (:class:`~megatron_longvideo.models.rotary.PositionRotaryEmbedding`,
  plain or multimodal) at the given positions, applied by megatron's ``apply_rotary_pos_emb``, as the
  training forward does;
* causal SDPA over this rank's local heads and the cache of its local query groups (GQA);
* ``linear_proj`` row-parallel: local matmul, all-reduce over TP, bias; residual;
* pre-MLP RMSNorm, SwiGLU (``linear_fc1``'s shard is ``[gate_r, up_r]``), ``linear_fc2`` row-parallel; residual.

Then the final norm and the (possibly tied) vocab-parallel output layer, all-gathered over TP into
full-vocabulary fp32 logits, so every TP rank samples the same tokens; sampled tokens are embedded
through the vocab-parallel word embedding (masked lookup, all-reduce). Each prompt is prefilled once with
one row; its cache is then repeated to one row per response and decoded by the shared loop
(:func:`~megatron_longvideo.rl.engines.decode.decode`), so a response drawn with a seed is the token
sequence the ``hf`` engines draw with it.

Contract (``shards_over_tp``): every TP rank of a replica calls :meth:`MegatronEngine.generate` together,
with the same prompts, positions, sampling and seeds, and gets the same completions. CP ranks generate
independently (nothing here uses the CP group). Pipeline parallelism is refused. Both ``transformer_impl``
values are read: ``local`` (our RMSNorm modules) and ``transformer_engine`` (norm weights fused into
``linear_qkv`` / ``linear_fc1`` as ``layer_norm_weight``; RMSNorm only). The policy's weights are read at
each call, so an optimizer step is seen by the next rollout without a sync (the DDP used here gathers
parameters synchronously; an overlapped parameter all-gather would have to finish first).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from megatron_longvideo.models.llm import unwrap
from megatron_longvideo.parallel.collectives import all_gather, all_reduce
from megatron_longvideo.parallel.groups import ParallelGroups
from megatron_longvideo.platform.device import device_of
from megatron_longvideo.rl.engines.base import Completion, RolloutEngine, SamplingConfig, Weights, check_prompt_embeds
from megatron_longvideo.rl.engines.decode import decode, draws_of, prompt_positions

__all__ = ["MegatronEngine"]


# -- the model as functions of its weights ------------------------------------------------------------
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As :class:`~megatron_longvideo.models.norm.RMSNorm`: normalised in fp32, cast back, then scaled."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _bias(module) -> Optional[torch.Tensor]:
    b = getattr(module, "bias", None)
    return None if b is None or b.numel() == 0 else b  # TE keeps an empty tensor for "no bias"


def _column(x: torch.Tensor, module) -> torch.Tensor:
    """Column-parallel linear on this rank's shard: ``[.., in] -> [.., out / tp]``."""
    return F.linear(x, module.weight, _bias(module))


def _row(x: torch.Tensor, module, tp_group) -> torch.Tensor:
    """Row-parallel linear: ``[.., in / tp] -> [.., out]``, partial sums all-reduced over TP, then the bias."""
    y = all_reduce(F.linear(x, module.weight), tp_group)
    b = _bias(module)
    return y if b is None else y + b


def _norm_weights(layer, te: bool, eps: float) -> tuple:
    """(input norm weight, pre-MLP norm weight, eps) of one layer, in either implementation's names."""
    if te:
        return layer.self_attention.linear_qkv.layer_norm_weight, layer.mlp.linear_fc1.layer_norm_weight, eps
    return layer.input_layernorm.weight, layer.pre_mlp_layernorm.weight, layer.input_layernorm.eps


class _KVCache:
    """Keys and values of every layer, ``[rows, ng_local, capacity, head_dim]`` each, filled to ``length``."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0

    def repeat(self, rows: int, capacity: int) -> None:
        """From a one-row prefill to ``rows`` rows with room for ``capacity`` positions."""
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                big = t.new_empty(rows, t.shape[1], capacity, t.shape[3])
                big[:, :, : self.length] = t[:, :, : self.length]
                store[i] = big


class _Decoder:
    """The policy's LLM as prefill / step functions of its weights (see the module docstring)."""

    def __init__(self, lm, groups: ParallelGroups, te: bool):
        config = lm.config
        self.lm, self.groups, self.te, self.config = lm, groups, te, config
        tp = groups.tp_size
        self.num_heads = config.num_attention_heads // tp  # local query heads
        self.num_groups = config.num_query_groups // tp  # local key/value heads
        self.head_dim = config.kv_channels
        self.scale = config.softmax_scale if config.softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.eps = config.layernorm_epsilon

    def _rotary(self, positions: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` or ``[3, b, s]`` positions -> ``[s, b, 1, dim]`` frequencies (the policy's rotary module)."""
        with self.lm.sequence_context.use(position_ids=positions):
            return self.lm.rotary_pos_emb(positions.shape[-1])

    def _attention(self, layer, x: torch.Tensor, freqs: torch.Tensor, cache: _KVCache, index: int) -> torch.Tensor:
        """``[s, b, h]`` normed input -> ``[s, b, h]`` attention output; writes its keys and values at
        ``cache.length``.. and attends to everything before them and causally among them."""
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        attn = layer.self_attention
        s, b, _ = x.shape
        per_group = self.num_heads // self.num_groups
        mixed = _column(x, attn.linear_qkv).view(s, b, self.num_groups, (per_group + 2) * self.head_dim)
        q, k, v = mixed.split([per_group * self.head_dim, self.head_dim, self.head_dim], dim=-1)
        q = q.reshape(s, b, self.num_heads, self.head_dim)  # [s, b, np, hd]: heads of group j are j*np/ng ..
        q = apply_rotary_pos_emb(q, freqs, self.config, cp_group=self.groups.cp)
        k = apply_rotary_pos_emb(k, freqs, self.config, cp_group=self.groups.cp)  # [s, b, ng, hd]
        start, end = cache.length, cache.length + s
        assert start == 0 or s == 1, "decode steps feed one token per row"
        if index == len(cache.keys):  # prefill: the cache is exactly this prompt
            cache.keys.append(k.permute(1, 2, 0, 3).contiguous())  # [b, ng, s, hd]
            cache.values.append(v.permute(1, 2, 0, 3).contiguous())
        else:
            cache.keys[index][:, :, start:end] = k.permute(1, 2, 0, 3)
            cache.values[index][:, :, start:end] = v.permute(1, 2, 0, 3)
        keys, values = cache.keys[index][:, :, :end], cache.values[index][:, :, :end]
        out = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), keys, values, is_causal=start == 0 and s > 1,
                                             scale=self.scale, enable_gqa=True)  # [b, np, s, hd]
        out = out.permute(2, 0, 1, 3).reshape(s, b, self.num_heads * self.head_dim)
        return _row(out, attn.linear_proj, self.groups.tp)

    def _mlp(self, layer, x: torch.Tensor) -> torch.Tensor:
        gate, up = _column(x, layer.mlp.linear_fc1).chunk(2, dim=-1)  # this rank's [gate_r, up_r]
        return _row(self.config.activation_func(gate) * up, layer.mlp.linear_fc2, self.groups.tp)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: _KVCache) -> torch.Tensor:
        """``[s, b, h]`` inputs at ``positions`` after the cached ones -> last-position logits ``[b, V]`` (fp32)."""
        freqs = self._rotary(positions)
        for i, layer in enumerate(self.lm.decoder.layers):
            norm_in, norm_mlp, eps = _norm_weights(layer, self.te, self.eps)
            x = x + self._attention(layer, _rms_norm(x, norm_in, eps), freqs, cache, i)
            x = x + self._mlp(layer, _rms_norm(x, norm_mlp, eps))
        cache.length += x.shape[0]
        final = self.lm.decoder.final_layernorm
        hidden = _rms_norm(x[-1], final.weight, getattr(final, "eps", self.eps))  # [b, h]
        lm = self.lm
        weight = lm.shared_embedding_or_output_weight() if lm.share_embeddings_and_output_weights else lm.output_layer.weight
        logits = F.linear(hidden, weight)  # [b, V / tp]
        return all_gather(logits.float().contiguous(), -1, self.groups.tp)  # [b, V]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[b]`` ids -> ``[1, b, h]`` through the vocab-parallel word embedding (masked lookup, all-reduce)."""
        word = self.lm.embedding.word_embeddings
        outside = (tokens < word.vocab_start_index) | (tokens >= word.vocab_end_index)
        local = (tokens - word.vocab_start_index).masked_fill(outside, 0)
        out = F.embedding(local, word.weight).masked_fill(outside[:, None], 0.0)
        return all_reduce(out, self.groups.tp)[None]


# -- the engine ---------------------------------------------------------------------------------------
def _check_supported(lm) -> bool:
    """Raise ValueError for a layout or model this engine does not reproduce; True for TE's layer spec."""
    config = lm.config
    unsupported = {"num_moe_experts": None, "multi_latent_attention": False, "qk_layernorm": False,
                   "apply_residual_connection_post_layernorm": False, "fp32_residual_connection": False,
                   "gated_linear_unit": True, "activation_func_clamp_value": None, "glu_linear_offset": 0.0}
    for name, want in unsupported.items():
        if getattr(config, name, want) != want:
            raise ValueError(f"engine 'megatron': {name}={getattr(config, name)!r} is not supported (Qwen2 layers only)")
    if not (lm.pre_process and lm.post_process):
        raise ValueError("engine 'megatron': this rank holds only part of the pipeline; it needs the whole LLM")
    layer = lm.decoder.layers[0]
    te = hasattr(layer.self_attention.linear_qkv, "layer_norm_weight")
    if te and (config.normalization != "RMSNorm" or getattr(config, "layernorm_zero_centered_gamma", False)):
        raise ValueError(f"engine 'megatron': transformer_impl='transformer_engine' with normalization="
                         f"{config.normalization!r} (zero-centred gamma: {config.layernorm_zero_centered_gamma}); "
                         f"only RMSNorm with a plain gamma is supported")
    return te


class MegatronEngine(RolloutEngine):
    """Rollouts with the policy's own megatron LLM on its device, in its parameter dtype (logits in fp32).

    ``cfg``: the model config (LLMConfig, VLMConfig or a Qwen2.5-VL config); ``policy``: the (possibly
    DDP-wrapped) model; ``groups``: its :class:`~megatron_longvideo.parallel.groups.ParallelGroups`.
    ``device`` / ``dtype`` (the other engines' options) may be given only as the policy's own."""

    takes_video_prompts = False
    needs_weight_sync = False
    """The engine reads the policy's weights: the trainer need not gather a full state for it."""
    shards_over_tp = True
    """Every TP rank of a replica calls :meth:`generate` together with identical inputs, and gets identical results."""

    def __init__(self, cfg, *, policy, groups: ParallelGroups, tokenizer: Any = None, pad_token_id: int = 0,
                 device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None):
        if groups.config.pipeline_parallel_size > 1:
            raise ValueError(f"engine 'megatron': pipeline_parallel_size={groups.config.pipeline_parallel_size} is not "
                             f"supported (each rank would hold only some layers); use --engine hf, or PP=1")
        llm = getattr(cfg, "llm", cfg)
        inner = unwrap(policy)
        self.lm = getattr(inner, "llm", inner)
        self.groups = groups
        self.te = _check_supported(self.lm)
        self.mrope = llm.mrope_section is not None
        if tuple(self.lm.rotary_pos_emb.mrope_section or ()) != tuple(llm.mrope_section or ()):
            raise ValueError(f"cfg.mrope_section={llm.mrope_section} differs from the policy's "
                             f"{self.lm.rotary_pos_emb.mrope_section}")
        self.hidden_size = llm.hidden_size
        self.tokenizer, self.pad_token_id = tokenizer, pad_token_id
        self.device = device_of(self.lm)
        self.dtype = self.lm.embedding.word_embeddings.weight.dtype
        asked = None if device is None else torch.device(device)
        if asked is not None and (asked.type != self.device.type or asked.index not in (None, self.device.index)):
            raise ValueError(f"device={device!r}: the 'megatron' engine runs where the policy is ({self.device})")
        if dtype is not None and dtype != self.dtype:
            raise ValueError(f"dtype={dtype}: the 'megatron' engine computes in the policy's dtype ({self.dtype})")
        self._decoder = _Decoder(self.lm, groups, self.te)
        self._sleep_level = 0

    def sync_weights(self, weights: Weights) -> None:
        """Nothing to copy: the engine runs on the policy's own weights (``weights`` is not read)."""

    # -- positions -------------------------------------------------------------------------------------
    def _prompt_positions(self, length: int, given: Optional[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(positions of a one-row prompt, ``[1, L]`` or ``[3, 1, L]``; the first response token's position)."""
        return prompt_positions(length, given, mrope=self.mrope, device=self.device)

    def _step_positions(self, position: int) -> torch.Tensor:
        shape = (3, 1, 1) if self.mrope else (1, 1)  # every row decodes at the same position
        return torch.full(shape, position, dtype=torch.long, device=self.device)

    def _tp_seeds(self, draws: list[list[Optional[int]]]) -> list[list[Optional[int]]]:
        """Unseeded responses get seeds from TP rank 0, so every TP rank draws the same tokens."""
        if self.groups.tp_size == 1 or all(s is not None for row in draws for s in row):
            return draws
        import torch.distributed as dist

        flat = torch.randint(0, 2**62, (sum(len(row) for row in draws),), device="cpu").to(self.device)
        dist.broadcast(flat, group=self.groups.tp, group_src=0)
        fresh = iter(flat.tolist())
        return [[next(fresh) if s is None else s for s in row] for row in draws]

    # -- generation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt_embeds: Sequence[torch.Tensor], sampling: SamplingConfig,
                 positions: Optional[Sequence[torch.Tensor]] = None, *,
                 seeds: Optional[Sequence[Sequence[Optional[int]]]] = None) -> list[list[Completion]]:
        """As :meth:`RolloutEngine.generate` (and the ``hf`` engines': ``positions[i]`` ``[3, L_i]`` for a
        multimodal-RoPE LLM, default its text positions; none for plain RoPE). Collective over TP."""
        if self._sleep_level:
            raise RuntimeError("generate: the engine is asleep; call wake() first")
        check_prompt_embeds(prompt_embeds, self.hidden_size)
        if sampling.stop and self.tokenizer is None:
            raise ValueError("sampling.stop: stop strings need a tokenizer; build the engine with tokenizer=...")
        if positions is not None and len(positions) != len(prompt_embeds):
            raise ValueError(f"positions: {len(positions)} for {len(prompt_embeds)} prompts")
        draws = self._tp_seeds(draws_of(sampling, len(prompt_embeds), seeds))
        model = self._decoder
        results = []
        for i, e in enumerate(prompt_embeds):
            length, rows = int(e.shape[0]), len(draws[i])
            pos, first = self._prompt_positions(length, None if positions is None else positions[i])
            cache = _KVCache()

            def prefill(e=e, pos=pos, cache=cache, rows=rows, length=length):
                x = e.detach().to(self.device, self.dtype)[:, None]  # [L, 1, h]
                logits = model.forward(x, pos, cache)  # [1, V]
                cache.repeat(rows, length + sampling.max_new_tokens)
                return logits.expand(rows, -1)

            def step(token, t, cache=cache, first=first):
                return model.forward(model.embed(token), self._step_positions(first + t), cache)  # [rows, V]

            results.append(decode(prefill, step, sampling, draws[i], device=self.device, tokenizer=self.tokenizer))
        return results

    # -- memory ----------------------------------------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        """Nothing to offload (the weights are the policy's; the KV cache lives only inside :meth:`generate`)."""
        if level not in (1, 2):
            raise ValueError(f"level: must be 1 (offload weights) or 2 (drop weights), got {level!r}")
        self._sleep_level = self._sleep_level or level

    def wake(self) -> None:
        self._sleep_level = 0
