"""MR-SP stage 2: sequence-parallel prefill of long merged sequences, for log-probs and the update.

For a :class:`~megatron_longvideo.rl.packing.PrefillBatch` (rows of token ids with video placeholders,
per-row positions and segments, and the next-token targets a pass needs), each CP rank:

1. takes its shard of the rows in Megatron's load-balanced order, padded to a multiple of 2 x CP
   (x TP under sequence parallelism) by the shard kernel: the padded global tensor is never built;
2. embeds only its own text tokens and merges the video embeddings (encoded once over the encode
   group, MR-SP stage 1) into its shard with the fused merge kernel;
3. runs the LLM on the shard (CP attention over the group);
4. evaluates the output layer only at the positions that predict a target (a long video prefix has
   thousands of positions and no targets), vocab-parallel under TP: full-vocab logits are never
   materialised, and per-token log-probs and entropies come from sharded logits.

Rows of unequal length are padded per sample to a common length (``[b, S]``), not packed THD-style
with cumulative lengths: the attention engine works on dense ``[s, b, h]`` shards and a host-side
layout of the rows (:func:`prefill_layout`), and right-padding is exact under the causal mask (no
real token ever sees a later padding token). Shared-prefix packing puts a whole group in one row.

Each target is computed on the CP rank holding its source position. The update pass sums its loss
over local targets (megatron DDP adds up the ranks); :func:`dense_values` assembles the per-target
values of all ranks for the rollout buffer (old-policy and reference log-probs).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Optional, Sequence

import torch

from megatron_longvideo import kernels
from megatron_longvideo.models.encode import encode_videos
from megatron_longvideo.models.llm import lm_forward, unwrap
from megatron_longvideo.parallel import collectives
from megatron_longvideo.parallel.groups import ParallelGroups
from megatron_longvideo.platform.device import compute_device
from megatron_longvideo.rl.packing import PrefillBatch

__all__ = ["ShardPlan", "plan_shard", "prefill_forward", "prefill_layout", "token_logprobs", "dense_values", "prefill_step",
           "vocab_parallel_entropy", "unshard_sequence"]


@dataclasses.dataclass
class ShardPlan:
    """This CP rank's view of a prefill batch (index math only, no model).

    Computed on the host from the host-side batch; what meets activations is moved to the compute
    device once, here."""

    positions: torch.Tensor
    """``[s_local]`` global position of each local slot (-1: padding); host (it shards host tensors)."""
    owned: torch.Tensor
    """``[n_local]`` indices of the targets whose source position this rank holds (compute device)."""
    rows: torch.Tensor
    """``[n_local]`` row of each owned target's source in the flattened ``[s_local * b]`` output (device)."""
    targets: torch.Tensor
    """``[n_local]`` the owned targets' token ids (device)."""
    seq_len: int
    """Unpadded row length S."""


def _multiple(groups: ParallelGroups) -> int:
    return groups.tp_size if groups.config.sequence_parallel else 1


def plan_shard(batch: PrefillBatch, groups: ParallelGroups, device=None) -> ShardPlan:
    """Which positions and targets this CP rank holds (``device``: default the compute device)."""
    device = compute_device() if device is None else device
    b, s = batch.input_ids.shape
    positions = kernels.shard_positions(s, groups.cp_size, groups.cp_rank, _multiple(groups), device="cpu")  # [s_local]
    local_of = kernels.inverse_index(positions, s)  # [S] -> local slot or -1
    sources = batch.sources.cpu()
    row, pos = sources // s, sources % s
    slot = local_of[pos]
    owned = torch.nonzero(slot >= 0).flatten()  # host index math: no device sync
    return ShardPlan(positions=positions, owned=owned.to(device), rows=(slot[owned] * b + row[owned]).to(device),
                     targets=batch.targets.cpu()[owned].to(device), seq_len=s)


@contextlib.contextmanager
def _only_rows(model, rows: torch.Tensor, groups: ParallelGroups):
    """Make the LLM's output layer see only ``rows`` of the flattened ``[s_local * b, h]`` decoder output."""
    from megatron.core import tensor_parallel

    gpt = unwrap(model)
    gpt = getattr(gpt, "llm", gpt)
    sp = groups.config.sequence_parallel and groups.tp_size > 1

    def hook(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if sp:  # the decoder output is sequence-sharded over TP: whole sequence first, then select
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False, group=groups.tp)
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)[:, None, :]  # [k, 1, h]
        return (picked,) + tuple(output[1:]) if isinstance(output, tuple) else picked

    handle = gpt.decoder.register_forward_hook(hook) if gpt.post_process else None
    saved = gpt.output_layer.sequence_parallel if gpt.post_process else None
    if gpt.post_process and sp:
        gpt.output_layer.sequence_parallel = False  # its input is now replicated over TP
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
            gpt.output_layer.sequence_parallel = saved


def _video_embeddings(model, batch: PrefillBatch, videos, groups, cache, cache_keys) -> list[list[torch.Tensor]]:
    """Per row, the embeddings of its group's videos; each distinct video encoded once."""
    encoder = unwrap(model).vision
    unique, where, keys = [], {}, []
    for g, sample in enumerate(videos):
        for j, v in enumerate(sample):
            if id(v) not in where:
                where[id(v)] = len(unique)
                unique.append(v)
                keys.append(None if cache_keys is None else cache_keys[g][j])
    encoded = encode_videos(encoder, unique, groups, cache=cache, keys=None if cache_keys is None else keys) if unique else []
    return [[encoded[where[id(v)]] for v in videos[g]] for g in batch.row_group]


def prefill_forward(
    model,
    groups: ParallelGroups,
    batch: PrefillBatch,
    plan: ShardPlan,
    *,
    videos: Optional[Sequence[Sequence[torch.Tensor]]] = None,
    cache=None,
    cache_keys=None,
    pad_id: int = 0,
    seconds_per_frame: Optional[Sequence[Sequence[float]]] = None,
):
    """Run this rank's shard through the model; on the last pipeline stage returns the vocab-parallel
    logits ``[1, n_local, vocab / tp]`` of the owned targets' source positions. ``seconds_per_frame[g]``:
    group ``g``'s videos' frame spacing, for a family with multimodal RoPE (None: its default)."""
    from megatron.core import tensor_parallel

    inner = unwrap(model)
    device = plan.rows.device
    multiple = _multiple(groups)
    # sharded on the host (index data), then one host-to-device copy each
    ids_local = kernels.shard(batch.input_ids, plan.positions, dim=1, pad_value=pad_id).to(device)  # [b, s_local]
    positions_of = getattr(inner, "prefill_positions", None)  # a family with multimodal RoPE: [3, rows, S]
    if positions_of is not None:
        positions = positions_of(batch, videos, seconds_per_frame=seconds_per_frame)
        pos_local = kernels.shard(positions, plan.positions, dim=2, pad_value=0).to(device)
    else:
        pos_local = kernels.shard(batch.position_ids, plan.positions, dim=1, pad_value=0).to(device)
    seg_local = None
    if batch.segment_ids is not None:
        seg_local = kernels.shard(batch.segment_ids, plan.positions, dim=1, pad_value=-1).to(device)
    decoder_input = None
    if inner.pre_process:
        from megatron_longvideo.models.vlm import text_embeddings

        text = text_embeddings(model, ids_local)  # [b, s_local, h]
        video_token = getattr(getattr(inner, "cfg", None), "video_token_id", None)
        if videos is not None and video_token is not None:
            per_row = _video_embeddings(model, batch, videos, groups, cache, cache_keys)
            in_prefix = torch.arange(batch.input_ids.shape[1], device="cpu")[None, :] < batch.prefix_lens[:, None]
            mask = (batch.input_ids == video_token) & in_prefix  # [b, S] (host)
            counts = mask.sum(1).tolist()
            for i, row in enumerate(per_row):
                given = sum(int(v.shape[0]) for v in row)
                if given != counts[i]:
                    raise ValueError(f"row {i}: {counts[i]} video placeholder tokens but its videos give {given} embeddings")
            flat = [v for row in per_row for v in row]
            video = torch.cat(flat).to(text.dtype) if flat else text.new_zeros(0, text.shape[-1])  # [V_total, h]
            src = kernels.merge_source_index_batched(mask, groups.cp_size, groups.cp_rank, multiple, num_video=video.shape[0])
            text = kernels.merge_shard(text, video, src.to(text.device))  # [b, s_local, h]
        decoder_input = text.transpose(0, 1).contiguous()  # [s_local, b, h]
        if groups.config.sequence_parallel:
            decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input, group=groups.tp)
    with _only_rows(model, plan.rows, groups):
        return lm_forward(model, decoder_input=decoder_input, position_ids=pos_local, segment_ids=seg_local,
                          layout=prefill_layout(batch, groups))


def prefill_layout(batch: PrefillBatch, groups: ParallelGroups):
    """The batch's attention layout over the padded global rows, built on the host from the batch's own
    segment ids (packed) or as plain causal rows (unpacked): the attention then needs no device sync."""
    from megatron_longvideo.attention.layout import SequenceLayout

    padded = kernels.padded_length(batch.input_ids.shape[1], groups.cp_size, _multiple(groups))
    if batch.segment_ids is None:
        return SequenceLayout.plain(padded)
    return SequenceLayout.from_segments(batch.segment_ids, seq_len=padded)


def vocab_parallel_entropy(logits: torch.Tensor, tp_group) -> torch.Tensor:
    """Entropy of softmax over a vocabulary split across TP: ``[..., v / tp]`` -> ``[...]``.

    ``H = m + log Z - sum_v e^{l_v - m} l_v / Z`` with ``Z = sum_v e^{l_v - m}``, sums over all TP
    shards; the max ``m`` is a constant shift (H does not depend on it), so it carries no gradient.
    """
    import torch.distributed as dist

    logits = logits.float()
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    m = logits.detach().max(dim=-1, keepdim=True).values
    if tp > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    e = torch.exp(logits - m)
    z = e.sum(-1)
    a = (e * logits).sum(-1)
    # sums over the vocabulary shards; backward identity: the entropy downstream is replicated over TP
    z = collectives.all_reduce(z, tp_group)
    a = collectives.all_reduce(a, tp_group)
    return m.squeeze(-1) + torch.log(z) - a / z


def token_logprobs(logits: torch.Tensor, batch: PrefillBatch, plan: ShardPlan, groups: ParallelGroups):
    """Log-prob and entropy of each owned target: ``[1, n_local, v/tp]`` -> two ``[n_local]``."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = logits.float().transpose(0, 1)  # [n_local, 1, v/tp]
    target = plan.targets[:, None]  # [n_local, 1]
    entropy = vocab_parallel_entropy(logits[:, 0], groups.tp)
    # megatron's cross entropy works in place on its input (fp32 .float() is no copy): give it its own
    logp = -vocab_parallel_cross_entropy(logits.clone(), target)[:, 0]
    return logp, entropy


def dense_values(local: torch.Tensor, plan: ShardPlan, num_targets: int, groups: ParallelGroups) -> torch.Tensor:
    """``[n_local]`` values of owned targets -> ``[n]`` for every target, on every CP rank.

    forward: scatter into zeros and sum over CP; backward: identity (each rank's own entries).
    """
    dense = local.new_zeros(num_targets).index_copy(0, plan.owned, local)
    return collectives.all_reduce(dense, groups.cp)


def unshard_sequence(local: torch.Tensor, plan: ShardPlan, groups: ParallelGroups) -> torch.Tensor:
    """Per-position outputs of this rank's shard ``[b, s_local, ...]`` -> ``[b, S, ...]`` in the original
    order without padding, on every CP rank (all-gather over CP, then the unshard kernel).

    backward: each rank receives the gradient of its own positions (the gathered copies feed a
    replicated downstream computation)."""
    cp = groups.cp_size
    index = kernels.unshard_index(plan.seq_len, cp, _multiple(groups), device=local.device)
    gathered = collectives.all_gather(local.unsqueeze(0), 0, groups.cp, grad_reduce="slice")  # [cp, b, s_local, ...]
    return kernels.unshard(gathered, index, dim=1)


def prefill_step(
    groups: ParallelGroups,
    batch: PrefillBatch,
    *,
    videos=None,
    cache=None,
    cache_keys=None,
    pad_id: int = 0,
    loss_fn: Optional[Callable] = None,
    seconds_per_frame: Optional[Sequence[Sequence[float]]] = None,
):
    """A megatron ``forward_step`` (see training.engine.forward_backward) for one prefill micro-batch.

    Without ``loss_fn`` (forward-only log-prob pass) the loss function reports ``{"logp": [n],
    "entropy": [n]}`` for every target. With ``loss_fn(logp_local, entropy_local, plan)`` ->
    ``(loss_sum, num_tokens, report)`` it is the update pass; ``num_tokens`` should count local
    targets only so that DDP's per-token normalisation counts each target once. ``seconds_per_frame``: as
    :func:`prefill_forward`'s.
    """
    plan = plan_shard(batch, groups)

    def step(_mb, model):
        output = prefill_forward(model, groups, batch, plan, videos=videos, cache=cache, cache_keys=cache_keys, pad_id=pad_id,
                                 seconds_per_frame=seconds_per_frame)

        def loss_func(logits):
            logp, entropy = token_logprobs(logits, batch, plan, groups)
            if loss_fn is not None:
                return loss_fn(logp, entropy, plan)
            report = {
                "logp": dense_values(logp.detach(), plan, batch.num_targets, groups),
                "entropy": dense_values(entropy.detach(), plan, batch.num_targets, groups),
            }
            return logp.sum() * 0.0, torch.tensor(plan.owned.numel(), dtype=torch.int, device=logp.device), report

        return output, loss_func

    return step
