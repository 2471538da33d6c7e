"""Next-token loss through megatron's schedules, with the sequence sharded for context parallelism."""

from __future__ import annotations

from typing import Optional

import torch

from megatron_longvideo.models.llm import lm_forward
from megatron_longvideo.parallel.context import zigzag_index
from megatron_longvideo.parallel.groups import ParallelGroups
from megatron_longvideo.platform.device import compute_device

__all__ = ["cp_shard", "lm_loss_step"]


def cp_shard(x: torch.Tensor, groups: ParallelGroups, dim: int = 1) -> torch.Tensor:
    """This CP rank's tokens of ``x`` along ``dim`` (Megatron's load-balanced order).

    The length along ``dim`` must be a multiple of ``2 * cp`` (times TP under sequence parallelism);
    :mod:`megatron_longvideo.kernels` pads arbitrary lengths.
    """
    cp = groups.cp_size
    multiple = 2 * cp if cp > 1 else 1
    if groups.config.sequence_parallel:
        multiple *= groups.tp_size
    seq = x.shape[dim]
    if seq % multiple != 0:
        raise ValueError(
            f"sequence length {seq} is not divisible by {multiple} (2 x context_parallel_size"
            f"{' x tensor_parallel_size for sequence parallelism' if groups.config.sequence_parallel else ''}); "
            f"pad it first (megatron_longvideo.kernels pads and shards in one pass)"
        )
    if cp == 1:
        return x
    index = zigzag_index(seq // cp, cp, groups.cp_rank, x.device)
    return x.index_select(dim, index)


def lm_loss_step(groups: ParallelGroups):
    """A ``forward_step`` for :func:`megatron_longvideo.training.engine.forward_backward`.

    A micro-batch is a dict of ``[b, S]`` tensors: ``tokens``, ``labels``, ``loss_mask`` and optionally
    ``position_ids`` (default 0..S-1) and ``segment_ids``. The loss function returns the sum of the
    masked per-token losses and their count (megatron's per-token loss convention).
    """

    device = compute_device()

    def step(batch: dict, model):
        layout = None
        if batch.get("segment_ids") is not None:  # from the host copy: the attention then needs no sync
            from megatron_longvideo.attention.layout import SequenceLayout

            layout = SequenceLayout.from_segments(batch["segment_ids"])
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}  # host batches: one copy each
        tokens = cp_shard(batch["tokens"], groups)
        labels = cp_shard(batch["labels"], groups)
        mask = cp_shard(batch["loss_mask"], groups).float()
        position_ids = batch.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(batch["tokens"].shape[1], device=tokens.device).expand_as(batch["tokens"])
        position_ids = cp_shard(position_ids, groups, dim=-1)  # [b, s] or [3, b, s] (multimodal RoPE)
        segment_ids: Optional[torch.Tensor] = batch.get("segment_ids")
        if segment_ids is not None:
            segment_ids = cp_shard(segment_ids, groups)
        output = lm_forward(model, input_ids=tokens, position_ids=position_ids, labels=labels, segment_ids=segment_ids,
                            layout=layout)

        def loss_func(losses: torch.Tensor):
            loss_sum = (losses.float() * mask).sum()
            num_tokens = mask.sum().to(torch.int)
            return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}

        return output, loss_func

    return step
