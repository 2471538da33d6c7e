"""Next-token loss of the video-language model on a collated batch (projector pretraining, CoT-SFT).

The data pipeline's batch (:class:`megatron_longvideo.data.VideoBatchCollator`) holds ``input_ids`` and
``labels`` aligned (``labels[t] = input_ids[t]`` on the target, ``IGNORE_INDEX`` on the prompt, the video
placeholders and padding) and each sample's visual inputs (``videos``: a list per sample, empty for a
text-only one). :func:`prepare_vlm_batch` shifts the labels to next-token targets and pads the sequence
to a length the CP sharding accepts; :func:`vlm_loss_step` is the
``forward_step`` for :func:`megatron_longvideo.training.engine.forward_backward`: parallel encoding,
merge, CP sharding and the LLM all happen in :func:`megatron_longvideo.models.vlm.vlm_forward`. With
``pack=True`` (``--pack-sequences``) the samples are packed into fewer rows instead of padded
(:mod:`megatron_longvideo.training.packing`): the same loss and gradients, without the padding.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_longvideo.data.prompts import IGNORE_INDEX
from megatron_longvideo.parallel.groups import ParallelGroups

__all__ = ["LOSS_KEY", "sequence_multiple", "prepare_vlm_batch", "vlm_loss_step"]

LOSS_KEY = "lm loss"
"""Key of the ``[loss sum, token count]`` report of a loss function (megatron's per-token convention)."""


def sequence_multiple(groups: ParallelGroups) -> int:
    """The sequence length must be a multiple of this: 2 x CP (load-balanced sharding), x TP under SP."""
    multiple = 2 * groups.cp_size if groups.cp_size > 1 else 1
    return multiple * (groups.tp_size if groups.config.sequence_parallel else 1)


def prepare_vlm_batch(batch: dict, *, pad_id: int, multiple: int = 1, seq_length: Optional[int] = None) -> dict:
    """Collated batch -> ``input_ids``, ``labels`` (next token), ``loss_mask`` ``[b, S]`` and ``videos``.

    ``S`` is ``seq_length`` when given (pipeline parallelism needs one length for every micro-batch), else
    the batch length rounded up to ``multiple``.
    """
    input_ids, labels = batch["input_ids"], batch["labels"]  # [b, s]
    if labels is None:
        raise ValueError("batch has no labels: the dataset mode must be 'pretrain' or 'sft' for a loss step")
    b, s = input_ids.shape
    length = seq_length if seq_length is not None else -(-s // multiple) * multiple
    if length < s or length % multiple:
        raise ValueError(f"seq_length={length} must be >= the batch's longest sample ({s} tokens) and a "
                         f"multiple of {multiple}")
    device = input_ids.device
    target = torch.full((b, length), IGNORE_INDEX, dtype=torch.long, device=device)  # [b, S]
    target[:, : s - 1] = labels[:, 1:]
    ids = torch.full((b, length), pad_id, dtype=torch.long, device=device)  # [b, S]
    ids[:, :s] = input_ids
    mask = target != IGNORE_INDEX
    return {"input_ids": ids, "labels": target.masked_fill(~mask, 0), "loss_mask": mask.float(),
            "videos": [list(videos) for videos in batch["videos"]]}


def vlm_loss_step(groups: ParallelGroups, *, pad_id: int, seq_length: Optional[int] = None, pack: bool = False):
    """``forward_step(batch, model) -> (per-token loss, loss_func)`` on collated batches.

    ``loss_func`` returns the masked loss sum, the token count and ``{LOSS_KEY: [sum, count]}``.
    ``pack``: pack each micro-batch (:func:`~megatron_longvideo.training.packing.pack_vlm_batch`; one row,
    or first-fit rows of ``seq_length``) rather than pad it to ``[b, S]``.
    """
    from megatron_longvideo.models.vlm import vlm_forward
    from megatron_longvideo.training.lm_step import cp_shard
    from megatron_longvideo.training.packing import pack_vlm_batch, packed_vlm_forward

    if pack and groups.size(groups.pp) > 1:
        raise ValueError("--pack-sequences: not supported with pipeline parallelism (a packed micro-batch has a "
                         "varying number of rows; the pipeline needs one tensor shape)")
    multiple = sequence_multiple(groups)

    def step(batch: dict, model):
        if pack:
            mb = pack_vlm_batch(batch, pad_id=pad_id, multiple=multiple, seq_length=seq_length)
            output = packed_vlm_forward(model, groups, mb)
        else:
            mb = prepare_vlm_batch(batch, pad_id=pad_id, multiple=multiple, seq_length=seq_length)
            output = vlm_forward(model, groups, input_ids=mb["input_ids"], videos=mb["videos"], labels=mb["labels"])
        mask = cp_shard(mb["loss_mask"], groups)  # [b, s_local]

        def loss_func(losses: torch.Tensor):
            loss_sum = (losses.float() * mask.to(losses.device)).sum()
            num_tokens = mask.sum().to(torch.int)
            return loss_sum, num_tokens, {LOSS_KEY: torch.stack([loss_sum.detach(), num_tokens.float()])}

        return output, loss_func

    return step
