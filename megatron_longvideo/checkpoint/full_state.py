"""Full (unsharded) state dicts of megatron models: gather TP/PP shards, and load a full dict back.

The "full" layout is the world=1 layout of the same model with one exception that makes it
independent of TP: a SwiGLU ``linear_fc1`` weight (and bias) is ``cat(gate, up)`` over the full width
(under TP each rank holds ``cat(gate_r, up_r)``, so a plain concatenation of shards would interleave
them). Layer names are global (``decoder.layers.{global index}``) whatever the pipeline stage. A
replicated vision tower (``encode_replica``) is taken as it is; a TP-sharded one (Qwen2.5-VL with
``encode_group="cp"``) is gathered like the LLM.

Used by the invariance tests (parameters and gradients compared at full shape), the Hugging Face
weight map and the rollout engines' weight sync. Tensors are moved through torch.distributed one at a
time; the whole dict is materialised on every rank, which is fine for the tiny and small models this
is used with in tests and for conversion one shard at a time.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_longvideo.parallel.groups import ParallelGroups

__all__ = ["gather_full_state", "load_full_state", "load_full_state_items", "iter_full_state", "global_name",
           "canonical_name"]

def _layer_offsets(model) -> dict[str, int]:
    """``"<block>.layers.<local>."`` -> global layer index, for every transformer block of ``model``."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    offsets = {}
    for path, module in model.named_modules():
        if isinstance(module, TransformerBlock):
            prefix = f"{path}.layers." if path else "layers."
            for i, layer in enumerate(module.layers):
                offsets[f"{prefix}{i}."] = layer.layer_number - 1
    return offsets


_LAYER = re.compile(r"^(.*?layers\.)(\d+)(\..*)$")


def global_name(name: str, offsets: dict[str, int]) -> str:
    """``<block>.layers.{local}.x`` -> ``<block>.layers.{global}.x`` (pipeline stages number locally)."""
    m = _LAYER.match(name)
    if not m:
        return name
    key = f"{m.group(1)}{m.group(2)}."
    if key not in offsets:
        return name
    return f"{m.group(1)}{offsets[key]}{m.group(3)}"


# TransformerEngine's layer spec fuses each pre-norm into the linear after it; full states (and through
# them the Hugging Face map, the rollout engines and the converter) always use the local spec's names
_TE_NAMES = ((".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight"),
             (".self_attention.linear_qkv.layer_norm_bias", ".input_layernorm.bias"),
             (".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"),
             (".mlp.linear_fc1.layer_norm_bias", ".pre_mlp_layernorm.bias"))


def canonical_name(name: str) -> str:
    """A parameter name in the local layer spec's terms (TE's fused norm names mapped back)."""
    for te, local in _TE_NAMES:
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def _is_swiglu_fc1(name: str, model) -> bool:
    """Whether ``name`` is the weight or bias of a gated (SwiGLU) MLP's ``linear_fc1``: its full tensor is
    cat(gate, up) and each TP rank holds cat(gate_r, up_r). Decided by the MLP's own config, so the LLM's,
    a SwiGLU vision tower's (Qwen2.5-VL) and a GELU tower's (SigLIP, the projectors) each get their rule."""
    path, _, leaf = name.rpartition(".")
    if leaf not in ("weight", "bias") or not (path == "linear_fc1" or path.endswith(".linear_fc1")):
        return False
    mlp = model.get_submodule(path[: -len("linear_fc1")].rstrip("."))
    return bool(getattr(getattr(mlp, "config", None), "gated_linear_unit", False))


def _tp_sharded(param) -> bool:
    # a replicated vision tower (its own one-rank TP group) carries TP attributes on its linears, but no shards
    return getattr(param, "tensor_model_parallel", False) and not getattr(param, "encode_replica", False)


def _tp_gather(t: torch.Tensor, param, name: str, model, tp_group) -> torch.Tensor:
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    if tp == 1 or not _tp_sharded(param):
        return t
    dim = param.partition_dim
    t = t.contiguous()
    if _is_swiglu_fc1(name, model):
        gate, up = t.chunk(2, dim=0)
        return torch.cat([_all_gather_cat(gate, 0, tp_group), _all_gather_cat(up, 0, tp_group)], dim=0)
    return _all_gather_cat(t, dim, tp_group)


def _all_gather_cat(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _tp_slice(full: torch.Tensor, param, name: str, model, tp_group) -> torch.Tensor:
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    if tp == 1 or not _tp_sharded(param):
        return full
    r = dist.get_rank(tp_group)
    if _is_swiglu_fc1(name, model):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, 0)[r], up.chunk(tp, 0)[r]], dim=0)
    return full.chunk(tp, dim=param.partition_dim)[r]


def _grad_of(param) -> Optional[torch.Tensor]:
    grad = getattr(param, "main_grad", None)
    if grad is None:
        grad = param.grad
    return grad


def gather_full_state(
    model,
    groups: ParallelGroups,
    *,
    what: str = "param",
    select: Optional[Callable[[str], bool]] = None,
) -> dict[str, torch.Tensor]:
    """Full-shape parameters (``what="param"``) or gradients (``what="grad"``, read from DDP's
    ``main_grad`` when present) of ``model`` on every rank, keyed by global name."""
    from megatron_longvideo.models.llm import unwrap

    if what not in ("param", "grad"):
        raise ValueError(f"what must be 'param' or 'grad', got {what!r}")
    model = unwrap(model)
    offsets = _layer_offsets(model)
    local: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if select is not None and not select(name):
            continue
        t = param.detach() if what == "param" else _grad_of(param)
        if t is None:
            t = torch.zeros_like(param)
        local[canonical_name(global_name(name, offsets))] = _tp_gather(t.detach().float().clone(), param, name, model,
                                                                       groups.tp)
    if groups.size(groups.pp) == 1:
        return local
    # pickled CUDA tensors would land on the sender's device index on the receiver: exchange host copies
    local = {k: v.cpu() for k, v in local.items()}
    stages: list = [None] * groups.size(groups.pp)
    dist.all_gather_object(stages, local, group=groups.pp)
    full: dict[str, torch.Tensor] = {}
    for stage in stages:
        for key, value in stage.items():
            # untied embeddings live on one stage each; a tied output weight on the last stage is a copy
            full.setdefault(key, value)
    return full


def _local_params(model) -> dict[str, tuple[str, torch.nn.Parameter]]:
    """Full-state key -> (local parameter name, parameter) of this rank's shard of ``model``."""
    offsets = _layer_offsets(model)
    return {canonical_name(global_name(name, offsets)): (name, param) for name, param in model.named_parameters()}


def _copy_shard(model, key: str, name: str, param, full: torch.Tensor, tp_group) -> None:
    shard = _tp_slice(full, param, name, model, tp_group)
    if shard.shape != param.shape:
        raise ValueError(f"{key}: full tensor {tuple(full.shape)} gives a shard {tuple(shard.shape)}, "
                         f"but this rank's parameter is {tuple(param.shape)}")
    param.copy_(shard.to(device=param.device, dtype=param.dtype))


@torch.no_grad()
def load_full_state(model, full: dict[str, torch.Tensor], groups: ParallelGroups, *, strict: bool = True) -> None:
    """Copy a full-shape state (global names) into this rank's shards of ``model``."""
    from megatron_longvideo.models.llm import unwrap

    model = unwrap(model)
    missing = []
    for key, (name, param) in _local_params(model).items():
        if key not in full:
            missing.append(key)
            continue
        _copy_shard(model, key, name, param, full[key], groups.tp)
    if strict and missing:
        raise KeyError(f"full state has no entry for {missing[:5]}{' ...' if len(missing) > 5 else ''}")


@torch.no_grad()
def load_full_state_items(model, items, groups: ParallelGroups, *, strict: bool = True) -> int:
    """Stream full-shape ``(key, tensor)`` pairs into this rank's shards of ``model``, one at a time
    (memory: the model plus one full tensor). Keys another pipeline stage holds are passed over; with
    ``strict`` every parameter of this rank must be written. Returns how many parameters were."""
    from megatron_longvideo.models.llm import unwrap

    model = unwrap(model)
    local = _local_params(model)
    written = set()
    for key, full in items:
        entry = local.get(key)
        if entry is None:
            continue
        _copy_shard(model, key, entry[0], entry[1], full, groups.tp)
        written.add(key)
    missing = [k for k in local if k not in written]
    if strict and missing:
        raise KeyError(f"the checkpoint has no entry for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return len(written)


def iter_full_state(model):
    """``(key, parameter)`` of a one-rank model (no TP or PP shards) in full-state names, without copies:
    what a single-process converter streams into the Hugging Face writer."""
    from megatron_longvideo.models.llm import unwrap

    model = unwrap(model)
    for key, (_, param) in _local_params(model).items():
        yield key, param.detach()
