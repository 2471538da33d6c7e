"""Megatron-core training plumbing shared by the pretrain, SFT and GRPO loops.

Models are wrapped in megatron's ``DistributedDataParallel``, optimised by ``get_megatron_optimizer``
(optionally the distributed optimizer) and run through megatron's pipeline schedules
(``get_forward_backward_func``: no pipelining, or 1F1B when PP > 1). Losses are per-token sums with
``calculate_per_token_loss``: the schedule adds up token counts, and ``finalize_model_grads`` divides
every gradient by the global count over DP x CP, so any layout gives the world=1 mean-token gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional

import torch

from megatron_longvideo.parallel.groups import ParallelGroups

__all__ = ["OptimConfig", "mixed_precision", "wrap_ddp", "build_optimizer", "forward_backward", "pending_optimizer_bytes"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Optimizer settings (megatron-core ``OptimizerConfig`` subset)."""

    lr: float = 1e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Floor of the learning-rate schedule."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over the data-parallel ranks (megatron's distributed optimizer)."""
    optimizer: str = "adam"
    """'adam' (AdamW) or 'sgd'."""
    loss_scale: Optional[float] = None
    """fp16 only: a static loss scale; None: dynamic loss scaling (megatron's)."""
    initial_loss_scale: float = 2.0**32
    """fp16 dynamic loss scaling: the starting scale (megatron's default; steps that overflow are
    skipped and the scale halves)."""

    def __post_init__(self):
        if self.lr < 0:
            raise ValueError(f"lr must be >= 0, got {self.lr}")
        if self.clip_grad < 0:
            raise ValueError(f"clip_grad must be >= 0, got {self.clip_grad}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")


def mixed_precision(model):
    """Wrap a 16-bit model (its config says ``bf16`` or ``fp16``) in megatron-core's ``Float16Module``,
    which casts fp32 inputs to the model's dtype on the first pipeline stage and its outputs back to
    fp32 on the last; an fp32 model is returned unchanged. DDP wrapping calls it; the frozen reference
    model goes through it too, so both see the same casts."""
    config = model.config
    if not (config.bf16 or config.fp16):
        return model
    from megatron.core.transformer.module import Float16Module

    if isinstance(model, Float16Module):
        return model
    return Float16Module(config, model)


def wrap_ddp(model, groups: ParallelGroups, *, use_distributed_optimizer: bool = False):
    """Wrap ``model`` in megatron-core DDP (gradients reduced over DP x CP into fp32 main_grad); a
    16-bit model goes through :func:`mixed_precision` first (megatron's Float16Module)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from megatron_longvideo.models.encode import reduce_encode_replica_grads

    def finalize(chunks, num_tokens=None, pg_collection=None, force_all_reduce=False):
        finalize_model_grads(chunks, num_tokens, pg_collection=pg_collection, force_all_reduce=force_all_reduce)
        for chunk in chunks:  # vision tower replicas saw different frames over the TP part of the encode group
            reduce_encode_replica_grads(chunk, groups)

    model = mixed_precision(model)
    config = model.config
    config.finalize_model_grads_func = finalize
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False,
        bucket_size=None,
    )
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model, pg_collection=groups.pg_collection)


def build_optimizer(ddp_models: Iterable, cfg: OptimConfig, *, params_dtype=None):
    """megatron-core optimizer for the DDP-wrapped model chunks.

    ``params_dtype`` (default: the models' own, from their config): for bf16 / fp16 models megatron
    keeps fp32 main weights and steps them (``Float16OptimizerWithFloat16Params``, or the distributed
    optimizer); fp16 adds dynamic loss scaling, hooked into the schedules through
    ``config.grad_scale_func`` as Megatron-LM does.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp_models = list(ddp_models)
    if params_dtype is None:
        first = ddp_models[0].config
        params_dtype = torch.bfloat16 if first.bf16 else torch.float16 if first.fp16 else torch.float32
    config = OptimizerConfig(
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        params_dtype=params_dtype,
        loss_scale=cfg.loss_scale,  # fp16: static when set, else dynamic; bf16 / fp32: unused
        initial_loss_scale=cfg.initial_loss_scale,
    )
    optimizer = get_megatron_optimizer(config, ddp_models, use_gloo_process_groups=False)
    for model in ddp_models:  # the schedules scale the loss before backward (a no-op unless fp16)
        model.config.grad_scale_func = optimizer.scale_loss
    return optimizer


def pending_optimizer_bytes(model, groups: ParallelGroups, *, distributed: bool = False, state_bytes: int = 8) -> int:
    """Bytes this rank's optimizer still allocates at its first step: Adam's two fp32 moments
    (``state_bytes`` per trainable parameter, sharded over DP x CP by the distributed optimizer) that torch
    creates lazily. What a rollout engine started before the first step must leave free."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shards = groups.size(groups.dp_cp) if distributed else 1
    return trainable * state_bytes // shards


def forward_backward(
    model,
    forward_step: Callable,
    microbatches: list,
    *,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
    groups: Optional[ParallelGroups] = None,
):
    """Run megatron's schedule over ``microbatches`` (one item per micro-batch).

    ``forward_step(batch, model) -> (output, loss_func)`` as megatron expects, except that it gets the
    micro-batch itself rather than an iterator. ``seq_length`` is the global (unsharded) length.
    Returns the list of what ``loss_func`` reported, on the last pipeline stage (empty elsewhere).
    Gradients accumulate into DDP's buffers: call ``zero_grad_buffer()`` on the model first.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    it = iter(microbatches)

    def step(data_iterator, chunk):
        return forward_step(next(data_iterator), chunk)

    fb = get_forward_backward_func()
    return fb(
        forward_step_func=step,
        data_iterator=it,
        model=model if isinstance(model, list) else [model],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
