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

__all__ = ["OptimConfig", "wrap_ddp", "build_optimizer", "forward_backward"]


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

    def __post_init__(self):
        if self.lr < 0:
            raise ValueError(f"lr must be >= 0, got {self.lr}")
        if self.clip_grad < 0:
            raise ValueError(f"clip_grad must be >= 0, got {self.clip_grad}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")


def wrap_ddp(model, groups: ParallelGroups, *, use_distributed_optimizer: bool = False):
    """Wrap ``model`` in megatron-core DDP (gradients reduced over DP x CP into fp32 main_grad)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from megatron_longvideo.models.encode import reduce_encode_replica_grads

    def finalize(chunks, num_tokens=None, pg_collection=None, force_all_reduce=False):
        finalize_model_grads(chunks, num_tokens, pg_collection=pg_collection, force_all_reduce=force_all_reduce)
        for chunk in chunks:  # vision tower replicas saw different frames over the TP part of the encode group
            reduce_encode_replica_grads(chunk, groups)

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


def build_optimizer(ddp_models: Iterable, cfg: OptimConfig, *, params_dtype=torch.float32):
    """megatron-core optimizer for the DDP-wrapped model chunks."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

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
    )
    return get_megatron_optimizer(config, list(ddp_models), use_gloo_process_groups=False)


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
