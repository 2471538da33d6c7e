"""DAPO dynamic sampling: drop groups whose rewards are all equal, refill the batch with new prompts.

A group whose G rewards are all equal (all right or all wrong) has zero group-relative advantage and
so contributes no policy gradient; it only dilutes the batch. ``DynamicSampler`` keeps the groups
that carry signal in a buffer and says how many prompts to draw next until the batch holds
``num_target_groups`` groups or ``max_rounds`` generation rounds are spent. It does no I/O: the
trainer generates, scores and hands groups in. One training step::

    sampler.reset()
    num_prompts = sampler.num_to_draw()
    while num_prompts:
        groups, rewards = rollout(next_prompts(num_prompts))  # rewards: [len(groups), G]
        num_prompts = sampler.add(groups, rewards)
    batch, stats = sampler.take()

Groups beyond the target in the last round are discarded (not carried to the next step, where they
would be off-policy); a batch still short after ``max_rounds`` is returned short and counted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from megatron_longvideo.rl.advantages import degenerate_groups


def filter_groups(rewards: torch.Tensor, *, tol: float = 0.0) -> torch.Tensor:
    """[num_groups] bool: True for groups to keep, i.e. rewards not all equal (``max - min > tol``)."""
    return ~degenerate_groups(rewards, tol=tol)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DynamicSamplingConfig:
    """Settings of ``DynamicSampler``; validated on construction."""

    num_target_groups: int
    """Groups (prompts) per training batch."""
    max_rounds: int = 3
    """Generation rounds per step, the first included (1: filter only, never refill)."""
    oversample: float = 1.0
    """Prompts drawn per missing group (>= 1); > 1 anticipates that some new groups will be dropped."""
    tol: float = 0.0
    """A group is dropped when ``max(rewards) - min(rewards) <= tol`` (its std is then 0 within tol)."""

    def __post_init__(self):
        if self.num_target_groups < 1:
            raise ValueError(f"num_target_groups: must be >= 1, got {self.num_target_groups}")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds: must be >= 1, got {self.max_rounds}")
        if not 1.0 <= self.oversample < math.inf:
            raise ValueError(f"oversample: must be finite and >= 1, got {self.oversample}")
        if self.tol < 0:
            raise ValueError(f"tol: must be >= 0, got {self.tol}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingStats:
    """Counts for logging, for one training step."""

    num_rounds: int
    """Generation rounds run."""
    num_generated_groups: int
    """Groups scored over all rounds."""
    num_dropped_groups: int
    """Groups dropped because their rewards were all equal."""
    num_overflow_groups: int
    """Kept groups discarded because the batch was already full."""
    num_missing_groups: int
    """How many groups short of ``num_target_groups`` the batch is (0 when full)."""


class DynamicSampler:
    """Buffer of groups with reward signal for one step; see the module doc for the loop."""

    def __init__(self, cfg: DynamicSamplingConfig):
        self.cfg = cfg
        self.reset()

    def reset(self) -> None:
        """Start a new step with an empty buffer."""
        self._kept: list[Any] = []
        self._rounds = 0
        self._generated = 0
        self._dropped = 0

    def num_to_draw(self) -> int:
        """Prompts to generate next: ``ceil(missing * oversample)``, 0 when full or out of rounds."""
        missing = self.cfg.num_target_groups - len(self._kept)
        if missing <= 0 or self._rounds >= self.cfg.max_rounds:
            return 0
        return math.ceil(missing * self.cfg.oversample)

    def add(self, groups: Sequence[Any], rewards: torch.Tensor) -> int:
        """Keep the groups whose rewards [len(groups), G] differ; returns ``num_to_draw()``."""
        if self.num_to_draw() == 0:
            raise RuntimeError("DynamicSampler.add: the batch is full or max_rounds is spent; call take()")
        if rewards.dim() != 2 or rewards.shape[0] != len(groups):
            raise ValueError(f"rewards: expected [{len(groups)}, group_size], got shape {tuple(rewards.shape)}")
        keep = filter_groups(rewards, tol=self.cfg.tol).tolist()
        self._kept.extend(group for group, k in zip(groups, keep) if k)
        self._rounds += 1
        self._generated += len(groups)
        self._dropped += len(groups) - sum(keep)
        return self.num_to_draw()

    def take(self) -> tuple[list[Any], SamplingStats]:
        """The batch (at most ``num_target_groups`` groups, in arrival order) and its stats; resets."""
        target = self.cfg.num_target_groups
        batch = self._kept[:target]
        stats = SamplingStats(
            num_rounds=self._rounds,
            num_generated_groups=self._generated,
            num_dropped_groups=self._dropped,
            num_overflow_groups=len(self._kept) - len(batch),
            num_missing_groups=target - len(batch),
        )
        self.reset()
        return batch, stats
