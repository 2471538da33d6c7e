"""The one weight map: full-shape Megatron state <-> Hugging Face state dict.

Megatron side: the names and layouts of :func:`~megatron_longvideo.checkpoint.full_state.gather_full_state`
(global layer numbers, TP shards gathered, SwiGLU ``linear_fc1`` = cat(gate, up)). Hugging Face side,
as written to disk (the layout of public checkpoints, which transformers 4.57+ and 5.x both load):

* LLM -> ``Qwen2ForCausalLM``: ``model.embed_tokens``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj``,
  ``mlp.{gate,up,down}_proj``, ``input_layernorm`` / ``post_attention_layernorm``, ``model.norm``,
  ``lm_head`` (absent when tied).
* VLM -> ``LlavaOnevisionForConditionalGeneration``: the same LM under ``language_model.model.`` and
  ``language_model.lm_head``; SigLIP under ``vision_tower.vision_model.`` (``embeddings.patch_embedding``,
  ``embeddings.position_embedding``, ``encoder.layers.{i}.{layer_norm1,self_attn,layer_norm2,mlp}``,
  ``post_layernorm``); ``multi_modal_projector.linear_{1,2}``; ``image_newline``.

Layouts: megatron's ``linear_qkv`` holds, per query group, [the group's q heads, k, v] along dim 0
(bias likewise; the ViT is multi-head, one q head per group); HF has separate q/k/v. ``linear_fc1`` of
the LLM is cat(gate, up). Everything else is a rename.

HF tensors with no Megatron home: the SigLIP ``post_layernorm`` (LLaVA-OneVision reads the features
before it) is written as identity unless the caller passes the original through ``extra_tensors``;
a tied ``lm_head`` is not written (transformers ties it). On import they are returned as unmapped.

Both directions are generators over ``(name, tensor)`` pairs so that big models pass one tensor at a
time; the HF -> Megatron direction holds at most the parts of one fused tensor (q, k, v or gate, up).
Every tensor's shape is checked against the config: a checkpoint of another shape fails with the
tensor's name and both shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator, Mapping, Optional, Union

import torch

from megatron_longvideo.models.llm import LLMConfig
from megatron_longvideo.models.llava_onevision.model import VLMConfig

__all__ = ["CheckpointMismatchError", "WeightMap", "megatron_to_hf", "hf_to_megatron", "split_qkv", "merge_qkv"]

Items = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: wrong shape, missing or unknown tensors."""


def split_qkv(t: torch.Tensor, num_heads: int, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron ``linear_qkv`` weight ``[(nh + 2 ng) d, in]`` (or bias ``[(nh + 2 ng) d]``) -> q, k, v."""
    per_group = num_heads // num_groups
    rest = t.shape[1:]
    d = t.shape[0] // (num_heads + 2 * num_groups)
    grouped = t.reshape(num_groups, per_group + 2, d, *rest)  # [ng, r + 2, d, ...]
    q = grouped[:, :per_group].reshape(num_heads * d, *rest)
    k = grouped[:, per_group].reshape(num_groups * d, *rest)
    v = grouped[:, per_group + 1].reshape(num_groups * d, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """Inverse of :func:`split_qkv`."""
    per_group = num_heads // num_groups
    rest = q.shape[1:]
    d = q.shape[0] // num_heads
    qg = q.reshape(num_groups, per_group, d, *rest)
    kg = k.reshape(num_groups, 1, d, *rest)
    vg = v.reshape(num_groups, 1, d, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape((num_heads + 2 * num_groups) * d, *rest).contiguous()


def _same(t: torch.Tensor) -> tuple[torch.Tensor]:
    return (t,)


def _only(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return parts[0]


@dataclasses.dataclass(frozen=True)
class _Rule:
    megatron: str
    hf: tuple[str, ...]
    megatron_shape: tuple[int, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    split: Callable = _same
    merge: Callable = _only


def _check(name: str, t: torch.Tensor, expected: tuple[int, ...], side: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise CheckpointMismatchError(
            f"{name}: the {side} has shape {tuple(t.shape)} but the model config expects {tuple(expected)} "
            f"(a checkpoint of another model shape?)"
        )


def _items(items: Items) -> Iterator[tuple[str, torch.Tensor]]:
    return iter(items.items()) if isinstance(items, Mapping) else iter(items)


class WeightMap:
    """Name and layout map of one model. ``WeightMap(LLMConfig)`` maps to ``Qwen2ForCausalLM``,
    ``WeightMap(VLMConfig)`` to ``LlavaOnevisionForConditionalGeneration``; :meth:`language_model`
    maps only the LLM of either to ``Qwen2ForCausalLM`` (rollout engines, initialising a VLM from a
    public Qwen2) and :meth:`vision_tower` only a VLM's ViT to SigLIP (a public SigLIP checkpoint)."""

    def __init__(self, cfg: Union[LLMConfig, VLMConfig], *, megatron_prefix: Optional[str] = None,
                 ignore_prefixes: tuple[str, ...] = (), vision_only: bool = False):
        if vision_only:
            if not isinstance(cfg, VLMConfig):
                raise TypeError(f"vision_only needs a VLMConfig, got {type(cfg).__name__}")
            self.architecture = "SiglipVisionModel"
            self.cfg, self.tied, self.ignore_prefixes = cfg, False, ("llm.", "vision.projector.", "vision.image_newline")
            self._tied_copy, self._hf_head, self.extras = None, None, {}
            self.rules = self._vision_rules(cfg, hf="vision_model.", projector=False)
            self._by_megatron = {r.megatron: r for r in self.rules}
            self._by_hf = {name: r for r in self.rules for name in r.hf}
            return
        if isinstance(cfg, VLMConfig):
            from megatron_longvideo.models.llava_onevision.hf import check_exportable_vision

            check_exportable_vision(cfg.vision)
            self.architecture = "LlavaOnevisionForConditionalGeneration"
            llm, mg, hf, head = cfg.llm, "llm.", "language_model.model.", "language_model.lm_head.weight"
        elif isinstance(cfg, LLMConfig):
            self.architecture = "Qwen2ForCausalLM"
            llm, mg, hf, head = cfg, "", "model.", "lm_head.weight"
        else:
            raise TypeError(f"expected an LLMConfig or a VLMConfig, got {type(cfg).__name__}")
        if megatron_prefix is not None:
            mg = megatron_prefix
        self.cfg = cfg
        self.tied = llm.tie_word_embeddings
        self.ignore_prefixes = tuple(ignore_prefixes)
        self._tied_copy = f"{mg}output_layer.weight" if self.tied else None
        self._hf_head = head
        rules = self._llm_rules(llm, mg, hf, head)
        self.extras: dict[str, torch.Tensor] = {}
        if isinstance(cfg, VLMConfig):
            rules += self._vision_rules(cfg)
            c = cfg.vision.hidden_size
            self.extras = {"vision_tower.vision_model.post_layernorm.weight": torch.ones(c),
                           "vision_tower.vision_model.post_layernorm.bias": torch.zeros(c)}
        self.rules = rules
        self._by_megatron = {r.megatron: r for r in rules}
        self._by_hf = {name: r for r in rules for name in r.hf}

    @classmethod
    def language_model(cls, cfg: Union[LLMConfig, VLMConfig]) -> "WeightMap":
        """The LLM alone as ``Qwen2ForCausalLM``; a VLM's ``llm.`` names, its ``vision.`` ones ignored (any
        family whose config has an ``llm``: its tower sits under ``vision.``)."""
        if not isinstance(cfg, LLMConfig) and isinstance(getattr(cfg, "llm", None), LLMConfig):
            return cls(cfg.llm, megatron_prefix="llm.", ignore_prefixes=("vision.",))
        return cls(cfg)

    @classmethod
    def vision_tower(cls, cfg: VLMConfig) -> "WeightMap":
        """A VLM's ViT alone as SigLIP (``vision_model.*``; a ``SiglipModel``'s text tower is ignored)."""
        return cls(cfg, vision_only=True)

    # -- rules ---------------------------------------------------------------------------------------
    @staticmethod
    def _llm_rules(llm: LLMConfig, mg: str, hf: str, head: str) -> list[_Rule]:
        h, nh, ng, d, ffn, vocab = (llm.hidden_size, llm.num_attention_heads, llm.num_query_groups,
                                    llm.head_dim, llm.ffn_hidden_size, llm.vocab_size)
        qkv = (nh + 2 * ng) * d

        def split(t):
            return split_qkv(t, nh, ng)

        def merge(parts):
            return merge_qkv(*parts, nh, ng)

        def split_fc1(t):
            gate, up = t.chunk(2, dim=0)
            return gate.contiguous(), up.contiguous()

        def merge_fc1(parts):
            return torch.cat(parts, dim=0)

        rules = [_Rule(f"{mg}embedding.word_embeddings.weight", (f"{hf}embed_tokens.weight",), (vocab, h), ((vocab, h),))]
        for i in range(llm.num_layers):
            m, p = f"{mg}decoder.layers.{i}.", f"{hf}layers.{i}."
            att = f"{p}self_attn."
            rules += [
                _Rule(f"{m}input_layernorm.weight", (f"{p}input_layernorm.weight",), (h,), ((h,),)),
                _Rule(f"{m}self_attention.linear_qkv.weight",
                      (f"{att}q_proj.weight", f"{att}k_proj.weight", f"{att}v_proj.weight"),
                      (qkv, h), ((nh * d, h), (ng * d, h), (ng * d, h)), split, merge),
                _Rule(f"{m}self_attention.linear_qkv.bias",
                      (f"{att}q_proj.bias", f"{att}k_proj.bias", f"{att}v_proj.bias"),
                      (qkv,), ((nh * d,), (ng * d,), (ng * d,)), split, merge),
                _Rule(f"{m}self_attention.linear_proj.weight", (f"{att}o_proj.weight",), (h, nh * d), ((h, nh * d),)),
                _Rule(f"{m}pre_mlp_layernorm.weight", (f"{p}post_attention_layernorm.weight",), (h,), ((h,),)),
                _Rule(f"{m}mlp.linear_fc1.weight", (f"{p}mlp.gate_proj.weight", f"{p}mlp.up_proj.weight"),
                      (2 * ffn, h), ((ffn, h), (ffn, h)), split_fc1, merge_fc1),
                _Rule(f"{m}mlp.linear_fc2.weight", (f"{p}mlp.down_proj.weight",), (h, ffn), ((h, ffn),)),
            ]
        rules.append(_Rule(f"{mg}decoder.final_layernorm.weight", (f"{hf}norm.weight",), (h,), ((h,),)))
        if not llm.tie_word_embeddings:
            rules.append(_Rule(f"{mg}output_layer.weight", (head,), (vocab, h), ((vocab, h),)))
        return rules

    @staticmethod
    def _vision_rules(cfg: VLMConfig, hf: str = "vision_tower.vision_model.", projector: bool = True) -> list[_Rule]:
        v, big = cfg.vision, cfg.llm.hidden_size
        c, nh, ffn, p = v.hidden_size, v.num_attention_heads, v.ffn_hidden_size, v.patch_size
        mg = "vision.vit."

        def split(t):
            return split_qkv(t, nh, nh)

        def merge(parts):
            return merge_qkv(*parts, nh, nh)

        def plain(m, name, shape):
            return _Rule(m, (name,), shape, (shape,))

        rules = [
            plain(f"{mg}conv1.weight", f"{hf}embeddings.patch_embedding.weight", (c, 3, p, p)),
            plain(f"{mg}conv1.bias", f"{hf}embeddings.patch_embedding.bias", (c,)),
            plain(f"{mg}position_embeddings.weight", f"{hf}embeddings.position_embedding.weight", (v.grid**2, c)),
        ]
        for i in range(v.num_layers):
            m, q = f"{mg}decoder.layers.{i}.", f"{hf}encoder.layers.{i}."
            for kind in ("weight", "bias"):
                extra = (c,) if kind == "weight" else ()
                rules += [
                    plain(f"{m}input_layernorm.{kind}", f"{q}layer_norm1.{kind}", (c,)),
                    _Rule(f"{m}self_attention.linear_qkv.{kind}",
                          tuple(f"{q}self_attn.{x}_proj.{kind}" for x in "qkv"),
                          (3 * c, *extra), ((c, *extra),) * 3, split, merge),
                    plain(f"{m}self_attention.linear_proj.{kind}", f"{q}self_attn.out_proj.{kind}", (c, *extra)),
                    plain(f"{m}pre_mlp_layernorm.{kind}", f"{q}layer_norm2.{kind}", (c,)),
                    plain(f"{m}mlp.linear_fc1.{kind}", f"{q}mlp.fc1.{kind}", (ffn, *((c,) if kind == "weight" else ()))),
                    plain(f"{m}mlp.linear_fc2.{kind}", f"{q}mlp.fc2.{kind}", (c, *((ffn,) if kind == "weight" else ()))),
                ]
        if not projector:
            return rules
        pj = "vision.projector.encoder."
        rules += [
            plain(f"{pj}linear_fc1.weight", "multi_modal_projector.linear_1.weight", (big, c)),
            plain(f"{pj}linear_fc1.bias", "multi_modal_projector.linear_1.bias", (big,)),
            plain(f"{pj}linear_fc2.weight", "multi_modal_projector.linear_2.weight", (big, big)),
            plain(f"{pj}linear_fc2.bias", "multi_modal_projector.linear_2.bias", (big,)),
            plain("vision.image_newline", "image_newline", (big,)),
        ]
        return rules

    # -- names ---------------------------------------------------------------------------------------
    @property
    def hf_names(self) -> list[str]:
        """Every HF tensor :meth:`to_hf` writes, extras included, in rule order."""
        return [n for r in self.rules for n in r.hf] + list(self.extras)

    @property
    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {n: s for r in self.rules for n, s in zip(r.hf, r.hf_shapes)}
        shapes.update({n: tuple(t.shape) for n, t in self.extras.items()})
        return shapes

    @property
    def megatron_shapes(self) -> dict[str, tuple[int, ...]]:
        return {r.megatron: r.megatron_shape for r in self.rules}

    def canonical_hf_name(self, name: str) -> str:
        """The on-disk name of ``name`` given in any layout transformers uses (in memory in 5.x:
        ``model.language_model.``, ``model.vision_tower.`` without ``vision_model.``, ``lm_head``)."""
        if self.architecture == "Qwen2ForCausalLM":
            return name
        if self.architecture == "SiglipVisionModel":
            for old in ("vision_tower.vision_model.", "model.vision_tower.", "vision_tower."):
                if name.startswith(old):
                    return "vision_model." + name[len(old):]
            known = name.startswith(("vision_model.", "text_model.")) or name in ("logit_scale", "logit_bias")
            return name if known else "vision_model." + name
        for old, new in (("model.language_model.", "language_model.model."), ("model.multi_modal_projector.", "multi_modal_projector."),
                         ("model.image_newline", "image_newline"), ("model.vision_tower.", "vision_tower.")):
            if name.startswith(old):
                name = new + name[len(old):]
        if name == "lm_head.weight":
            name = "language_model.lm_head.weight"
        if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
            name = "vision_tower.vision_model." + name[len("vision_tower."):]
        return name

    def _is_known_extra(self, name: str) -> bool:
        if self.architecture == "SiglipVisionModel":  # SigLIP's head, post-layernorm and text tower
            return not name.startswith("vision_model.encoder.") and not name.startswith("vision_model.embeddings.")
        return (name in self.extras or name.endswith("rotary_emb.inv_freq") or name.startswith("vision_tower.vision_model.head.")
                or (self.tied and name == self._hf_head))

    # -- directions ----------------------------------------------------------------------------------
    def to_hf(self, items: Items, *, extra_tensors: Optional[Mapping[str, torch.Tensor]] = None,
              passthrough: Optional[Mapping[str, torch.Tensor]] = None,
              strict: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Megatron ``(name, tensor)`` pairs -> HF pairs. ``extra_tensors`` replace the defaults of HF
        tensors with no Megatron home (see module docstring); ``passthrough`` tensors (what an import
        left unmapped, e.g. SigLIP's pooling head) are written after them, unchanged, under their own
        names. ``strict``: every mapped tensor must come."""
        seen = set()
        for name, t in _items(items):
            if name.startswith(self.ignore_prefixes) or name == self._tied_copy:
                continue
            rule = self._by_megatron.get(name)
            if rule is None:
                raise CheckpointMismatchError(f"{name}: not a tensor of a {self.architecture} of this config (unknown name)")
            _check(name, t, rule.megatron_shape, "Megatron tensor")
            seen.add(name)
            for hf_name, part, shape in zip(rule.hf, rule.split(t), rule.hf_shapes):
                _check(hf_name, part, shape, "converted tensor")
                yield hf_name, part
        if strict:
            missing = [r.megatron for r in self.rules if r.megatron not in seen]
            if missing:
                raise CheckpointMismatchError(f"the Megatron state lacks {len(missing)} tensor(s): {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        extra_tensors = dict(extra_tensors or {})
        for name, default in self.extras.items():
            t = extra_tensors.pop(name, None)
            t = default if t is None else t
            _check(name, t, default.shape, "extra tensor")
            yield name, t
        if extra_tensors:
            raise CheckpointMismatchError(f"extra_tensors has names this map does not write: {sorted(extra_tensors)[:5]}")
        for name, t in (passthrough or {}).items():
            if name in self._by_hf or name in self.extras:
                raise CheckpointMismatchError(f"{name}: a passthrough tensor with the name of a mapped one")
            yield name, t

    def to_megatron(self, items: Items, *, unmapped: Optional[dict] = None,
                    strict: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """HF ``(name, tensor)`` pairs (any transformers naming) -> Megatron full-state pairs. HF tensors
        with no Megatron home go to ``unmapped`` when given. With tied embeddings the embedding is also
        yielded as ``output_layer.weight`` (what a last pipeline stage holds)."""
        pending: dict[str, dict[str, torch.Tensor]] = {}
        done = set()
        for raw, t in _items(items):
            name = self.canonical_hf_name(raw)
            rule = self._by_hf.get(name)
            if rule is None:
                if self._is_known_extra(name):
                    if unmapped is not None:
                        unmapped[name] = t
                    continue
                raise CheckpointMismatchError(f"{raw}: not a tensor of a {self.architecture} of this config (unknown name)")
            _check(raw, t, rule.hf_shapes[rule.hf.index(name)], "checkpoint tensor")
            parts = pending.setdefault(rule.megatron, {})
            if name in parts or rule.megatron in done:
                raise CheckpointMismatchError(f"{raw}: appears twice in the checkpoint")
            parts[name] = t
            if len(parts) == len(rule.hf):
                del pending[rule.megatron]
                done.add(rule.megatron)
                merged = rule.merge(tuple(parts[n] for n in rule.hf))
                yield rule.megatron, merged
                if self._tied_copy and rule.megatron.endswith("embedding.word_embeddings.weight"):
                    yield self._tied_copy, merged
        if strict:
            missing = [n for r in self.rules if r.megatron not in done for n in r.hf if n not in pending.get(r.megatron, {})]
            if missing:
                raise CheckpointMismatchError(f"the checkpoint lacks {len(missing)} tensor(s): {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def megatron_to_hf(state: Items, cfg: Union[LLMConfig, VLMConfig], **kwargs) -> Iterator[tuple[str, torch.Tensor]]:
    """``WeightMap(cfg).to_hf(state, **kwargs)``."""
    return WeightMap(cfg).to_hf(state, **kwargs)


def hf_to_megatron(state: Items, cfg: Union[LLMConfig, VLMConfig], **kwargs) -> Iterator[tuple[str, torch.Tensor]]:
    """``WeightMap(cfg).to_megatron(state, **kwargs)``."""
    return WeightMap(cfg).to_megatron(state, **kwargs)
