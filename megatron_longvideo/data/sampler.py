"""A data-parallel, seeded, resumable sampler over a map-style dataset.

Each epoch is one permutation of ``range(num_samples)`` drawn from ``seed + epoch`` (or the identity
without shuffling). Global position ``p`` of the epoch goes to DP rank ``p % dp_size``, so rank ``r``
reads ``perm[r], perm[r + dp_size], ...``. Every rank gets the same count: the tail that does not fill
a whole round of ``dp_size`` is dropped (``drop_last``) or filled from the start of the permutation.
Only ``dp_rank`` enters the choice, so the TP / CP / PP ranks of one DP replica, which share a
dp_rank, read the same samples in the same order.

Position is counted in global samples consumed in the current epoch (as Megatron counts
``consumed_samples``). The training loop, or ``ResumableDataLoader``, calls ``advance`` as batches are
used; ``state_dict`` / ``load_state_dict`` save and restore ``(epoch, consumed_samples)``. A restored
run may change ``dp_size`` if ``consumed_samples`` is a multiple of the new one.
"""

from __future__ import annotations

import torch


class DistributedVideoSampler(torch.utils.data.Sampler):
    """Indices for one DP rank, deterministic for ``(seed, epoch)``, resumable mid-epoch."""

    def __init__(self, num_samples: int, *, dp_rank: int, dp_size: int, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        if dp_size < 1:
            raise ValueError(f"dp_size must be >= 1, got {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if drop_last and num_samples < dp_size:
            raise ValueError(f"num_samples ({num_samples}) < dp_size ({dp_size}) with drop_last leaves "
                             "every rank empty")
        self.num_samples = num_samples
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.consumed_samples = 0

    @property
    def samples_per_epoch(self) -> int:
        """Global samples in one epoch (a multiple of ``dp_size``)."""
        rounds = self.num_samples // self.dp_size if self.drop_last else -(-self.num_samples // self.dp_size)
        return rounds * self.dp_size

    def epoch_order(self, epoch: int) -> list[int]:
        """The global order of ``epoch`` (all ranks), after dropping or filling the tail."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=gen, device="cpu").tolist()
        else:
            order = list(range(self.num_samples))
        total = self.samples_per_epoch
        while len(order) < total:
            order += order[: total - len(order)]
        return order[:total]

    def rank_indices(self, epoch: int) -> list[int]:
        """This rank's indices for the whole of ``epoch``."""
        return self.epoch_order(epoch)[self.dp_rank :: self.dp_size]

    def __iter__(self):
        yield from self.rank_indices(self.epoch)[self.consumed_samples // self.dp_size :]

    def __len__(self) -> int:
        return (self.samples_per_epoch - self.consumed_samples) // self.dp_size

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        self.epoch = epoch
        self.consumed_samples = 0

    def advance(self, num_global_samples: int) -> None:
        """Record that ``num_global_samples`` more samples (over all DP ranks) were used."""
        if num_global_samples % self.dp_size:
            raise ValueError(f"num_global_samples must be a multiple of dp_size={self.dp_size}, "
                             f"got {num_global_samples}")
        self.consumed_samples += num_global_samples
        if self.consumed_samples >= self.samples_per_epoch:
            self.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "consumed_samples": self.consumed_samples,
                "num_samples": self.num_samples, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_samples", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: saved {key}={state[key]!r} but this sampler has "
                                 f"{key}={getattr(self, key)!r}")
        consumed = int(state["consumed_samples"])
        if consumed % self.dp_size:
            raise ValueError(f"cannot resume: consumed_samples={consumed} is not a multiple of dp_size="
                             f"{self.dp_size}")
        self.epoch = int(state["epoch"])
        self.consumed_samples = consumed
