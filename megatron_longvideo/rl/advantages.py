"""Advantages (GRPO, Dr.GRPO, RLOO, REINFORCE++ with baseline) and DAPO's overlong reward shaping.

One scalar per response from its group's rewards. For the G rewards ``r_1..r_G`` of one prompt's group
(:func:`compute_advantages` ``estimator``; :func:`group_advantages` keeps the first two as ``scale``):

    grpo          (scale="std"):  A_i = (r_i - mean(r)) / (std(r) + eps)
    dr_grpo       (scale="none"): A_i =  r_i - mean(r)
    rloo          A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r))        (needs G >= 2)
    reinforce_pp  B_i = r_i - mean(r) (group-mean baseline), then over the whole global batch
                  A_i = (B_i - mean_batch(B)) / (std_batch(B) + eps)

The batch of ``reinforce_pp`` spans the data-parallel ranks: its statistics come from the moments
``[count, sum, sum of squares]`` of B (float64, :func:`batch_moments`) summed over ranks, either by an
``all_reduce`` callable that sums a tensor in place (``functools.partial(torch.distributed.all_reduce,
group=dp_group)``) or given precomputed as ``global_moments``. :func:`batch_normalize` is that step alone.

``std`` is the **unbiased** (Bessel, divide by G - 1) sample standard deviation by default: the
GRPO paper writes only "std", and the common implementations (TRL's GRPOTrainer, verl's
``compute_grpo_outcome_advantage``) call ``torch.std`` with its unbiased default. ``unbiased=False``
divides by G instead (for the batch std of ``reinforce_pp`` too). A group whose rewards are all equal
(``max - min <= tol``, hence std == 0) gets exactly zero advantages, not ``(float noise) / eps``, under
every estimator.

DAPO's soft overlong punishment (:func:`overlong_penalty`), a reward term of the response length L, with
the generation budget L_max and the buffer L_cache, scaled by ``factor``:

    0                                  L <= L_max - L_cache
    (L_max - L_cache - L) / L_cache    L_max - L_cache < L <= L_max
    -1                                 L > L_max
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

SCALES = ("std", "none")
ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")


def degenerate_groups(rewards: torch.Tensor, *, tol: float = 0.0) -> torch.Tensor:
    """[num_groups] bool: True where a group's rewards are all equal, ``max - min <= tol``."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards: expected [num_groups, group_size], got shape {tuple(rewards.shape)}")
    if tol < 0:
        raise ValueError(f"tol: must be >= 0, got {tol}")
    return (rewards.amax(dim=1) - rewards.amin(dim=1)) <= tol


def group_advantages(
    rewards: torch.Tensor,
    *,
    group_size: int | None = None,
    scale: str = "std",
    unbiased: bool = True,
    eps: float = 1e-6,
    tol: float = 0.0,
) -> torch.Tensor:
    """Advantages with the shape of ``rewards``.

    ``rewards`` is [num_groups, G], or flat [num_groups * G] with ``group_size=G`` (consecutive
    responses form a group). ``scale`` is "std" (GRPO) or "none" (Dr.GRPO); ``eps`` guards the
    division; groups equal within ``tol`` get zero advantages.
    """
    if scale not in SCALES:
        raise ValueError(f"scale: {scale!r} is not one of {SCALES}")
    if eps < 0:
        raise ValueError(f"eps: must be >= 0, got {eps}")
    shape = rewards.shape
    rewards = _as_groups(rewards, group_size)  # [num_groups, G]
    if unbiased and scale == "std" and rewards.shape[1] < 2:
        raise ValueError("group_size: the unbiased std needs at least 2 responses per group")

    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    centered = rewards - rewards.mean(dim=1, keepdim=True)  # [num_groups, G]
    if scale == "std":
        std = rewards.std(dim=1, keepdim=True, correction=1 if unbiased else 0)  # [num_groups, 1]
        centered = centered / (std + eps)
    zero = degenerate_groups(rewards, tol=tol).unsqueeze(1)  # [num_groups, 1]
    return torch.where(zero, torch.zeros_like(centered), centered).view(shape)


def compute_advantages(
    rewards: torch.Tensor,
    *,
    estimator: str = "grpo",
    group_size: int | None = None,
    unbiased: bool = True,
    eps: float = 1e-6,
    tol: float = 0.0,
    global_moments: torch.Tensor | None = None,
    all_reduce: Callable[[torch.Tensor], object] | None = None,
) -> torch.Tensor:
    """Advantages with the shape of ``rewards`` under ``estimator`` (module doc).

    ``rewards``, ``group_size``, ``unbiased``, ``eps``, ``tol``: as for :func:`group_advantages` (``eps``
    guards the group std of "grpo" and the batch std of "reinforce_pp"). For "reinforce_pp" only: either
    ``global_moments`` ([3]: count, sum, sum of squares of the baselined rewards over the global batch) or
    ``all_reduce`` (sums the local :func:`batch_moments` in place over the data-parallel ranks); with
    neither, the local rewards are the whole batch. The baselined rewards of a rank are its "dr_grpo"
    advantages, so ``global_moments`` = SUM over ranks of ``batch_moments(compute_advantages(r, estimator="dr_grpo",
    tol=tol))``.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator: {estimator!r} is not one of {ESTIMATORS}")
    if estimator != "reinforce_pp" and (global_moments is not None or all_reduce is not None):
        raise ValueError(f"global_moments: batch statistics apply only to estimator='reinforce_pp', not {estimator!r}")
    if estimator in ("grpo", "dr_grpo"):
        scale = "std" if estimator == "grpo" else "none"
        return group_advantages(rewards, group_size=group_size, scale=scale, unbiased=unbiased, eps=eps, tol=tol)
    if eps < 0:
        raise ValueError(f"eps: must be >= 0, got {eps}")
    shape = rewards.shape
    grouped = _as_groups(rewards, group_size)  # [num_groups, G]
    grouped = grouped.to(torch.promote_types(grouped.dtype, torch.float32))
    num = grouped.shape[1]
    zero = degenerate_groups(grouped, tol=tol).unsqueeze(1)  # [num_groups, 1]
    centered = torch.where(zero, 0.0, grouped - grouped.mean(dim=1, keepdim=True))  # [num_groups, G]
    if estimator == "rloo":
        if num < 2:
            raise ValueError("group_size: RLOO's leave-one-out baseline needs at least 2 responses per group")
        return (centered * (num / (num - 1))).view(shape)
    out = batch_normalize(centered, moments=global_moments, all_reduce=all_reduce, unbiased=unbiased, eps=eps)
    return torch.where(zero, 0.0, out).view(shape)


def batch_moments(values: torch.Tensor) -> torch.Tensor:
    """[3] float64 ``[count, sum, sum of squares]`` of all ``values``: summed over ranks, the moments of the union."""
    v = values.detach().reshape(-1).to(torch.float64)
    return torch.stack([v.new_tensor(float(v.numel())), v.sum(), (v * v).sum()])


def batch_normalize(
    values: torch.Tensor,
    *,
    moments: torch.Tensor | None = None,
    all_reduce: Callable[[torch.Tensor], object] | None = None,
    unbiased: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``(values - mean) / (std + eps)`` with the batch mean and std (Bessel-corrected when ``unbiased``) from
    ``moments`` (:func:`batch_moments` of the global batch) or from the local moments summed in place by
    ``all_reduce``; with neither, of ``values`` alone. A batch with zero variance gives zeros."""
    if moments is not None and all_reduce is not None:
        raise ValueError("global_moments: give either precomputed global moments or all_reduce, not both")
    if eps < 0:
        raise ValueError(f"eps: must be >= 0, got {eps}")
    if moments is None:
        moments = batch_moments(values)
        if all_reduce is not None:
            all_reduce(moments)
    if moments.shape != (3,):
        raise ValueError(f"global_moments: expected [count, sum, sum of squares] (shape (3,)), got {tuple(moments.shape)}")
    moments = moments.detach().to(device=values.device, dtype=torch.float64)
    count, total, squares = moments.unbind()
    if float(count) < (2.0 if unbiased else 1.0):
        if values.numel() == 0:
            return values.to(torch.promote_types(values.dtype, torch.float32))
        raise ValueError(f"global_moments: the {'unbiased ' if unbiased else ''}batch std needs more values, count {float(count)}")
    mean = total / count
    var = ((squares - total * mean) / (count - 1.0 if unbiased else count)).clamp(min=0.0)
    dtype = torch.promote_types(values.dtype, torch.float32)
    out = ((values.to(torch.float64) - mean) / (var.sqrt() + eps)).to(dtype)
    return torch.where(var > 0, out, torch.zeros_like(out))


def overlong_penalty(
    lengths: torch.Tensor | Sequence[int],
    max_len: int,
    buffer: int,
    factor: float = 1.0,
) -> torch.Tensor:
    """DAPO's soft overlong punishment (module doc) of response ``lengths`` (any shape), times ``factor``;
    float32 (float64 for float64 lengths). ``buffer = 0``: 0 up to ``max_len``, -1 beyond."""
    if max_len <= 0:
        raise ValueError(f"max_len: must be positive, got {max_len}")
    if not 0 <= buffer <= max_len:
        raise ValueError(f"buffer: must be in [0, max_len={max_len}], got {buffer}")
    if not 0.0 <= factor < math.inf:
        raise ValueError(f"factor: must be finite and >= 0, got {factor}")
    lengths = torch.as_tensor(lengths)
    dtype = torch.float64 if lengths.dtype == torch.float64 else torch.float32
    length = lengths.to(dtype)
    start = float(max_len - buffer)
    ramp = (start - length) / max(buffer, 1)
    out = torch.where(length <= start, 0.0, torch.where(length <= max_len, ramp, -1.0))
    return out * factor


def _as_groups(rewards: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[num_groups, G] view of [num_groups, G] or flat [num_groups * G] rewards (consecutive responses a group)."""
    if rewards.dim() == 1:
        if group_size is None or group_size < 1 or rewards.numel() % group_size:
            raise ValueError(f"group_size: {group_size} must be positive and divide {rewards.numel()} rewards")
        return rewards.view(-1, group_size)
    if rewards.dim() != 2 or (group_size is not None and group_size != rewards.shape[1]):
        raise ValueError(f"rewards: expected [num_groups, group_size], got shape {tuple(rewards.shape)}")
    return rewards
