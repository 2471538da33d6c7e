"""The training loop shared by projector pretraining, CoT-SFT (and GRPO's update phase).

Read top to bottom: build (model -> megatron DDP -> optimizer -> LR scheduler), resume, then per step:
take ``num_microbatches`` micro-batches from the resumable loader, run megatron's schedule with the
caller's ``forward_step``, reduce the loss, skip the update if the loss is not finite (never applied,
logged), else clip and step; log (a printed line, TensorBoard scalars on rank 0); save every
``save_interval`` steps and at the end.

Resume rule: a complete checkpoint under ``save`` wins (this run's own progress); else ``load`` is
resumed in full, or, with ``finetune``, its weights only (fresh optimizer, scheduler, data, step 0:
a stage's checkpoint starting the next stage).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_longvideo.checkpoint.dist_ckpt import find_checkpoint, load_checkpoint, save_checkpoint
from megatron_longvideo.data.errors import report_run_skips
from megatron_longvideo.parallel.groups import ParallelGroups
from megatron_longvideo.platform.device import compute_device
from megatron_longvideo.training.engine import OptimConfig, build_optimizer, forward_backward, wrap_ddp
from megatron_longvideo.training.vlm_step import LOSS_KEY

__all__ = ["TrainConfig", "TrainResult", "build_scheduler", "train"]

log = logging.getLogger(__name__)
_DECAY_STYLES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Steps, batch sizes, schedule, checkpointing and logging of one run."""

    train_iters: int
    """Optimizer steps to train (the step count of the run, including steps before a resume)."""
    micro_batch_size: int = 1
    """Samples per micro-batch on each data-parallel rank."""
    global_batch_size: Optional[int] = None
    """Samples per step over all DP ranks; micro_batch_size x DP x (gradient accumulation steps).
    Default: micro_batch_size x DP (no accumulation)."""
    seq_length: Optional[int] = None
    """Pad every micro-batch to this length (needed with pipeline parallelism); default: the batch's."""
    lr_warmup_iters: int = 0
    """Linear warmup steps from 0 to the peak learning rate."""
    lr_decay_style: str = "cosine"
    """'constant', 'linear' or 'cosine' decay to min_lr."""
    lr_decay_iters: Optional[int] = None
    """Steps over which the LR decays (default: train_iters)."""
    save: Optional[str] = None
    """Checkpoint root to save into (and resume from when it holds a checkpoint)."""
    load: Optional[str] = None
    """Checkpoint (root or iter folder) to start from when ``save`` holds none."""
    finetune: bool = False
    """With ``load``: model weights only, fresh optimizer, scheduler and data position, step 0."""
    save_interval: int = 0
    """Save every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Keep the newest this many checkpoints (0: keep all)."""
    exit_interval: Optional[int] = None
    """Save and stop when the step count is a multiple of this (for job time limits)."""
    log_interval: int = 1
    """Print a progress line every this many steps."""
    tensorboard_dir: Optional[str] = None
    """Write TensorBoard scalars here (rank 0)."""
    verify_checksums: bool = True
    """Check every checkpoint file's sha256 against the manifest before loading."""

    def __post_init__(self):
        for name in ("train_iters", "micro_batch_size", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr_warmup_iters", "save_interval", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr_decay_style not in _DECAY_STYLES:
            raise ValueError(f"lr_decay_style must be one of {_DECAY_STYLES}, got {self.lr_decay_style!r}")
        if self.lr_warmup_iters >= (self.lr_decay_iters or self.train_iters) and self.lr_warmup_iters:
            raise ValueError(f"lr_warmup_iters={self.lr_warmup_iters} must be < lr_decay_iters (or train_iters)")
        if self.finetune and not self.load:
            raise ValueError("finetune needs load (the checkpoint whose weights start this stage)")
        if self.exit_interval is not None and self.exit_interval < 1:
            raise ValueError(f"exit_interval must be >= 1, got {self.exit_interval}")

    def num_microbatches(self, dp_size: int) -> int:
        """Gradient accumulation steps for ``dp_size`` data-parallel ranks."""
        per_step = self.micro_batch_size * dp_size
        total = self.global_batch_size or per_step
        if total % per_step:
            raise ValueError(f"global_batch_size={total} is not divisible by micro_batch_size x data-parallel "
                             f"size = {self.micro_batch_size} x {dp_size}")
        return total // per_step


@dataclasses.dataclass
class TrainResult:
    """What a run did (every rank gets the same numbers)."""

    losses: dict = dataclasses.field(default_factory=dict)
    """Step -> mean per-token loss of the steps run in this process."""
    skipped: list = dataclasses.field(default_factory=list)
    """Steps whose update was skipped (non-finite loss)."""
    step: int = 0
    """The last step reached."""
    start_step: int = 0
    """The step this process started from (after resume)."""
    model: object = None
    """The DDP-wrapped model."""
    optimizer: object = None
    """The megatron optimizer."""


def build_scheduler(optimizer, cfg: TrainConfig, optim: OptimConfig):
    """megatron's ``OptimizerParamScheduler`` stepping once per optimizer step."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if cfg.lr_warmup_iters else optim.lr, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=cfg.lr_warmup_iters, lr_decay_steps=cfg.lr_decay_iters or cfg.train_iters,
        lr_decay_style=cfg.lr_decay_style, start_wd=optim.weight_decay, end_wd=optim.weight_decay,
        wd_incr_steps=cfg.train_iters, wd_incr_style="constant", use_checkpoint_opt_param_scheduler=True,
    )


def _batches(loader):
    """Micro-batches forever, epoch after epoch (the loader keeps its own position)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the data loader yields no micro-batch: fewer samples than micro_batch_size x DP")


def _reduce_loss(reports: list, groups: ParallelGroups) -> tuple[float, float]:
    """(mean per-token loss, token count) over all micro-batches, DP x CP ranks and pipeline stages."""
    total = torch.zeros(2, device=compute_device())
    for report in reports:  # non-empty on the last pipeline stage only
        total += report[LOSS_KEY].detach().float()
    dist.all_reduce(total, group=groups.dp_cp)
    if groups.size(groups.pp) > 1:
        dist.all_reduce(total, group=groups.pp)
    bad = (~torch.isfinite(total).all()).float()[None]
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank takes the same skip decision
    # the step's one device-to-host read: the loss for the log and the NaN decision
    host = torch.cat([total, bad]).cpu()
    total, bad = host[:2], host[2]
    loss = total[0].item() / total[1].item() if total[1] > 0 else math.nan
    return (math.nan if bad.item() else loss), total[1].item()


def _writer(cfg: TrainConfig):
    if cfg.tensorboard_dir is None or dist.get_rank() != 0:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: no scalars written to %s (pip install tensorboard)", cfg.tensorboard_dir)
        return None
    return SummaryWriter(cfg.tensorboard_dir)


def _resume(cfg, *, model, groups, optimizer, scheduler, loader):
    """``(step, hf assets)`` after restoring this run's own checkpoint, else ``load``'s, else nothing.

    ``load`` restores weights only with ``finetune``, or when it holds no optimizer state (a converted
    checkpoint, e.g. written by ``convert_checkpoint.py from-hf``): a fresh start from those weights."""
    from megatron_longvideo.checkpoint.dist_ckpt import has_training_state

    own = find_checkpoint(cfg.save) if cfg.save else None
    source = own or (cfg.load if cfg.load else None)
    if source is None:
        return 0, None
    weights_only = own is None and (cfg.finetune or not has_training_state(source))
    info = load_checkpoint(source, model=model, groups=groups, optimizer=optimizer, scheduler=scheduler,
                           loader=loader, weights_only=weights_only, verify_checksums=cfg.verify_checksums)
    if dist.get_rank() == 0:
        print(f"loaded {info.path} ({', '.join(info.restored)}); starting at step {info.step}", flush=True)
    return info.step, info.assets


def train(cfg: TrainConfig, optim: OptimConfig, *, model_provider: Callable[[], object], groups: ParallelGroups,
          loader, forward_step: Callable, run_config: Optional[dict] = None) -> TrainResult:
    """Train ``model_provider()`` (an unwrapped megatron model of this rank) on ``loader``'s micro-batches.

    ``forward_step(batch, model) -> (output, loss_func)`` as for :func:`forward_backward`; its loss_func
    must report ``{LOSS_KEY: [loss sum, token count]}``. Collective over all ranks.
    """
    if groups.size(groups.pp) > 1 and cfg.seq_length is None:
        raise ValueError("seq_length must be set with pipeline parallelism (one tensor shape for every micro-batch)")
    num_micro = cfg.num_microbatches(groups.dp_size)
    if cfg.save:  # a second run on the same --save refuses at once, naming the first
        from megatron_longvideo.checkpoint.lock import lock_save_folder_on_rank0

        lock_save_folder_on_rank0(cfg.save)
    model = wrap_ddp(model_provider(), groups, use_distributed_optimizer=optim.use_distributed_optimizer)
    optimizer = build_optimizer([model], optim)
    scheduler = build_scheduler(optimizer, cfg, optim)
    step, assets = _resume(cfg, model=model, groups=groups, optimizer=optimizer, scheduler=scheduler, loader=loader)
    result = TrainResult(step=step, start_step=step, model=model, optimizer=optimizer)
    writer = _writer(cfg)
    batches = _batches(loader)
    skips = getattr(loader, "skip_report", None)  # bad inputs the loader skipped: in TensorBoard, summarised at the end
    ckpt = dict(model=model, groups=groups, optimizer=optimizer, scheduler=scheduler, loader=loader,
                run_config=run_config, keep=cfg.keep_checkpoints, assets=assets)
    while step < cfg.train_iters:
        start = time.perf_counter()
        micro = [next(batches) for _ in range(num_micro)]
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(model, forward_step, micro, seq_length=cfg.seq_length or 0,
                                   micro_batch_size=cfg.micro_batch_size)
        loss, num_tokens = _reduce_loss(reports, groups)
        step += 1
        grad_norm, lr = math.nan, optimizer.param_groups[0]["lr"]  # the rate this step uses
        if math.isfinite(loss):
            ok, norm, _ = optimizer.step()
            grad_norm = math.nan if norm is None else float(norm)
            if ok:
                scheduler.step(increment=1)
            else:
                result.skipped.append(step)
        else:
            result.skipped.append(step)
            log.warning("step %d: loss is %s; the update is skipped (gradients discarded)", step, loss)
        result.losses[step] = loss
        result.step = step
        if dist.get_rank() == 0 and (step % cfg.log_interval == 0 or step == cfg.train_iters):
            print(f"step {step}/{cfg.train_iters} | loss {loss:.4f} | lr {lr:.3e} | grad norm {grad_norm:.3f} | "
                  f"tokens {num_tokens:.0f} | skipped {len(result.skipped)} | "
                  f"{time.perf_counter() - start:.2f} s/step", flush=True)
        if writer is not None:
            for name, value in (("loss", loss), ("lr", lr), ("grad_norm", grad_norm), ("skipped", len(result.skipped))):
                writer.add_scalar(f"train/{name}", value, step)
            if skips is not None:
                for name, value in skips.as_scalars().items():
                    writer.add_scalar(name, value, step)
        stop = cfg.exit_interval is not None and step % cfg.exit_interval == 0
        if cfg.save and (step == cfg.train_iters or stop or (cfg.save_interval and step % cfg.save_interval == 0)):
            save_checkpoint(cfg.save, step, **ckpt)
        if stop:
            break
    if writer is not None:
        writer.close()
    if skips is not None:
        report_run_skips(skips, print)
    return result
