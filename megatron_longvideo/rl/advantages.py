"""Group-relative advantages (GRPO, Dr.GRPO): one scalar per response from its group's rewards.

For the G rewards ``r_1..r_G`` of one prompt's group:

    GRPO     (scale="std"):  A_i = (r_i - mean(r)) / (std(r) + eps)
    Dr.GRPO  (scale="none"): A_i =  r_i - mean(r)

``std`` is the **unbiased** (Bessel, divide by G - 1) sample standard deviation by default: the
GRPO paper writes only "std", and the common implementations (TRL's GRPOTrainer, verl's
``compute_grpo_outcome_advantage``) call ``torch.std`` with its unbiased default. ``unbiased=False``
divides by G instead. A group whose rewards are all equal (``max - min <= tol``, hence std == 0)
gets exactly zero advantages, not ``(float noise) / eps``.
"""

from __future__ import annotations

import torch

SCALES = ("std", "none")


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
    if rewards.dim() == 1:
        if group_size is None or group_size < 1 or rewards.numel() % group_size:
            raise ValueError(f"group_size: {group_size} must be positive and divide {rewards.numel()} rewards")
        rewards = rewards.view(-1, group_size)  # [num_groups, G]
    elif rewards.dim() != 2 or (group_size is not None and group_size != rewards.shape[1]):
        raise ValueError(f"rewards: expected [num_groups, group_size], got shape {tuple(shape)}")
    if unbiased and scale == "std" and rewards.shape[1] < 2:
        raise ValueError("group_size: the unbiased std needs at least 2 responses per group")

    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    centered = rewards - rewards.mean(dim=1, keepdim=True)  # [num_groups, G]
    if scale == "std":
        std = rewards.std(dim=1, keepdim=True, correction=1 if unbiased else 0)  # [num_groups, 1]
        centered = centered / (std + eps)
    zero = degenerate_groups(rewards, tol=tol).unsqueeze(1)  # [num_groups, 1]
    return torch.where(zero, torch.zeros_like(centered), centered).view(shape)
