"""Full (unsharded) state dicts of megatron models: gather TP/PP shards, and load a full dict back.

The "full" layout is the world=1 layout of the same model with one exception that makes it
independent of TP: a SwiGLU ``linear_fc1`` weight (and bias) is ``cat(gate, up)`` over the full width
(under TP each rank holds ``cat(gate_r, up_r)``, so a plain concatenation of shards would interleave
them). Layer names are global (``decoder.layers.{global index}``) whatever the pipeline stage. A
replicated vision tower (``encode_replica``) is taken as it is; a TP-sharded one (Qwen2.5-VL with
``encode_group="cp"``) is gathered like the LLM.

Used by the invariance tests (parameters and gradients compared at full shape), the Hugging Face
weight map and conversion. :func:`gather_full_state` moves tensors through torch.distributed one at a
time and materialises the whole dict (fp32 clones) on every rank, which is fine for the tiny and small
models of the tests. The rollout engines' weight sync streams instead: :func:`iter_full_state_buckets`
gathers the TP shards of a bounded bucket of parameters at a time, in their own (training) dtype, with
one all-gather per bucket; :func:`iter_full_state_items` yields its ``(key, tensor)`` pairs one by one.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_longvideo.parallel.groups import ParallelGroups

__all__ = ["gather_full_state", "iter_full_state_buckets", "iter_full_state_items", "load_full_state",
           "load_full_state_items", "iter_full_state", "global_name", "canonical_name"]

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


# -- streamed, bucketed gather (rollout weight sync) ---------------------------------------------------
Bucket = list[tuple[str, torch.Tensor]]


def _bucket_ranges(nbytes: list[int], bucket_bytes: int) -> list[range]:
    """Consecutive index ranges whose ``nbytes`` sum to at most ``bucket_bytes`` (a bigger one alone)."""
    ranges, start, size = [], 0, 0
    for i, n in enumerate(nbytes):
        if i > start and size + n > bucket_bytes:
            ranges.append(range(start, i))
            start, size = i, 0
        size += n
    if start < len(nbytes):
        ranges.append(range(start, len(nbytes)))
    return ranges


def _assemble(ranks: torch.Tensor, shape: torch.Size, dim: int, swiglu: bool) -> torch.Tensor:
    """``ranks`` ``[tp, *shape]`` (rank r's shard of one parameter) -> the full tensor, the layout of
    :func:`_tp_gather`: shards concatenated along ``dim``, or for a SwiGLU fc1 cat(gate_0.., up_0..)."""
    tp = ranks.shape[0]
    if swiglu:  # rank r holds cat(gate_r, up_r) along dim 0
        half = ranks.view(tp, 2, shape[0] // 2, *shape[1:])  # [tp, 2, s0 / 2, ...]
        return half.transpose(0, 1).reshape(tp * shape[0], *shape[1:])
    return torch.cat(ranks.unbind(0), dim=dim)


def _gather_shards(entries: list[tuple[str, str, torch.nn.Parameter]], model, group, tp: int,
                   dtype: torch.dtype) -> list[torch.Tensor]:
    """The full tensors of TP-sharded parameters of one dtype and device, from one all-gather of their
    flattened local shards."""
    shards = [param.detach().to(dtype) for _, _, param in entries]
    send = shards[0].reshape(-1) if len(shards) == 1 else torch.cat([s.reshape(-1) for s in shards])  # [n_local]
    recv = torch.empty(tp * send.numel(), dtype=dtype, device=send.device)  # [tp * n_local], rank-major
    dist.all_gather_into_tensor(recv, send.contiguous(), group=group)
    del send
    if len(entries) == 1 and entries[0][2].partition_dim == 0 and not _is_swiglu_fc1(entries[0][1], model):
        shape = shards[0].shape  # rank-major is already the full tensor: no copy
        return [recv.view(tp * shape[0], *shape[1:])]
    ranks = recv.view(tp, -1)  # [tp, n_local]
    full, offset = [], 0
    for (_, name, param), shard in zip(entries, shards):
        n = shard.numel()
        part = ranks[:, offset : offset + n].view(tp, *shard.shape)  # [tp, *local shape]
        full.append(_assemble(part, shard.shape, param.partition_dim, _is_swiglu_fc1(name, model)))
        offset += n
    return full


def _gather_bucket(entries: list[tuple[str, str, torch.nn.Parameter]], model, group, tp: int,
                   dtype: Optional[torch.dtype]) -> Bucket:
    out: dict[str, torch.Tensor] = {}
    by_kind: dict[tuple, list] = {}
    for key, name, param in entries:
        want = param.dtype if dtype is None else dtype
        if tp > 1 and _tp_sharded(param):
            by_kind.setdefault((want, param.device), []).append((key, name, param))
        else:  # replicated: the parameter itself (a detached view), cast only when asked for another dtype
            out[key] = param.detach().to(want)
    for (want, _), sharded in by_kind.items():
        for (key, _, _), t in zip(sharded, _gather_shards(sharded, model, group, tp, want)):
            out[key] = t
    return [(key, out[key]) for key, _, _ in entries]


def iter_full_state_buckets(model, groups: ParallelGroups, *, bucket_bytes: int,
                            select: Optional[Callable[[str], bool]] = None,
                            dtype: Optional[torch.dtype] = None) -> Iterator[Bucket]:
    """Buckets of ``(key, full tensor)``, the keys and values of :func:`gather_full_state` ``(model,
    groups, select=select)`` in its order, but in each parameter's own dtype (the training dtype: bf16
    for a bf16 model) or ``dtype``, and a bucket at a time.

    A bucket holds consecutive parameters whose full tensors sum to at most ``bucket_bytes`` (one
    bigger tensor goes alone). Its TP-sharded parameters come from one all-gather over ``groups.tp`` of
    their flattened shards (one per dtype present), reassembled as :func:`gather_full_state` does (SwiGLU
    fc1: cat(gate, up) over the full width); replicated ones are the parameters themselves, detached, not
    copied (cast when ``dtype`` differs): read them before the next optimizer step. Memory: while a bucket
    is gathered, the received buffer and the reassembled tensors (about ``2 x bucket_bytes``; a lone
    dim-0 tensor is received in place, ``1 x``; gloo stages the received buffer once more), then the
    bucket alone; never a full copy of the model.

    A collective per bucket: **every rank of the TP group must iterate this to the end**, also the ranks
    without a rollout engine (``for _ in it: pass``). The list handed out is emptied when the next bucket
    is asked for (so a ``for bucket in ...`` loop does not keep two alive): keep its tensors, not the list.
    Pipeline parallelism is refused (each stage holds other layers; use :func:`gather_full_state`).
    """
    from megatron_longvideo.models.llm import unwrap

    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        raise ValueError(f"bucket_bytes: must be a positive number of bytes, got {bucket_bytes!r}")
    if groups.size(groups.pp) > 1:
        raise ValueError(f"iter_full_state_buckets streams TP shards only, but pipeline_parallel_size="
                         f"{groups.size(groups.pp)} (each stage holds other layers): use gather_full_state, or PP=1 "
                         f"(the GRPO trainer's layout)")
    model = unwrap(model)
    tp = groups.size(groups.tp)
    offsets = _layer_offsets(model)
    entries = [(canonical_name(global_name(name, offsets)), name, param) for name, param in model.named_parameters()
               if select is None or select(name)]
    nbytes = [p.numel() * (tp if tp > 1 and _tp_sharded(p) else 1) * (p.dtype if dtype is None else dtype).itemsize
              for _, _, p in entries]
    ranges = _bucket_ranges(nbytes, bucket_bytes)

    def buckets():
        for r in ranges:
            bucket = _gather_bucket(entries[r.start : r.stop], model, groups.tp, tp, dtype)
            yield bucket
            bucket.clear()

    return buckets()


def iter_full_state_items(model, groups: ParallelGroups, *, bucket_bytes: int,
                          select: Optional[Callable[[str], bool]] = None,
                          dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The pairs of :func:`iter_full_state_buckets` one at a time (a pair handed out is no longer held
    here): what ``RolloutEngine.sync_weights`` takes. Every TP rank must iterate it to the end."""
    source = iter_full_state_buckets(model, groups, bucket_bytes=bucket_bytes, select=select, dtype=dtype)

    def items():
        for bucket in source:
            bucket.reverse()
            while bucket:
                yield bucket.pop()

    return items()


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
