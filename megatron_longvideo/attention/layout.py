"""Who may attend to whom: a host-side description of a batch's sequences, and the chunks a rank holds.

A :class:`SequenceLayout` describes every row of a batch in *global* coordinates (the whole,
unsharded sequence, padded to ``seq_len``) as runs of segments: ``(start, end, segment)``, in order,
covering ``[0, seq_len)``. Query ``i`` may attend key ``j`` when

* ``j <= i`` if the layout is causal, and
* ``segment(j) == segment(i)``, or ``segment(j)`` is the shared segment (the video + question prefix
  of a packed group, segment 0, which every packed response sees).

So a plain causal LM is one segment; a shared-prefix packed group ``[prefix | r1 | ... | rG | pad]`` is
segments ``0, 1, ..., G, -1`` (padding is a segment of its own: it sees the prefix and itself, never a
response, and no real token sees it); a ViT over frames is one non-causal segment per frame or window
with no shared segment.

A :data:`Chunk` ``(global_start, length, local_start)`` says where a contiguous piece of the global
sequence lives in a rank's local tensor. :func:`rank_chunks` gives a CP rank's own two zigzag chunks
(Megatron's load-balanced order: chunks ``r`` and ``2 cp - 1 - r``); :func:`gathered_chunks` the
rank-major concatenation of every rank's chunks (an all-gather's result). The tile planner
(:mod:`megatron_longvideo.attention.tiles`) turns a layout and two chunk lists into kernel calls.

Everything here is plain Python over ints (no tensors on the hot path, no device syncs), so a layout
is built once per forward on the host and shared by every layer.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

__all__ = ["Run", "Chunk", "SequenceLayout", "rank_chunks", "gathered_chunks", "runs_from_segments"]

Run = tuple[int, int, int]
"""``(start, end, segment)``: positions ``[start, end)`` of one row belong to ``segment``."""
Chunk = tuple[int, int, int]
"""``(global_start, length, local_start)``: global positions ``[g, g + n)`` live at local ``[l, l + n)``."""


def runs_from_segments(segments: Sequence[int]) -> tuple[Run, ...]:
    """Run-length encode one row's per-position segment ids (host ints)."""
    runs: list[Run] = []
    start = 0
    for i in range(1, len(segments) + 1):
        if i == len(segments) or segments[i] != segments[start]:
            runs.append((start, i, int(segments[start])))
            start = i
    return tuple(runs)


def _rows_from_tensor(segment_ids: torch.Tensor, seq_len: int, pad_segment: int) -> tuple[tuple[Run, ...], ...]:
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be [rows, seq], got shape {tuple(segment_ids.shape)}")
    seg = segment_ids.detach().to("cpu", torch.long)
    rows = []
    for row in seg:
        values = row.tolist()
        if len(values) < seq_len:
            values = values + [pad_segment] * (seq_len - len(values))
        rows.append(runs_from_segments(values))
    return tuple(rows)


@dataclasses.dataclass(frozen=True, eq=False)
class SequenceLayout:
    """The attention pattern of a batch of rows (see module docstring)."""

    seq_len: int
    """Global length of every row (padded to the CP / SP multiple)."""
    rows: Optional[tuple[tuple[Run, ...], ...]] = None
    """Per row, its segment runs covering ``[0, seq_len)``; ``None``: every row is one segment."""
    causal: bool = True
    """Keys later than the query are hidden."""
    shared_segment: Optional[int] = 0
    """Keys of this segment are visible to every query (subject to causality); ``None``: none shared."""
    _plans: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {self.seq_len!r}")
        if self.rows is not None:
            for i, runs in enumerate(self.rows):
                pos = 0
                for start, end, _ in runs:
                    if start != pos or end <= start:
                        raise ValueError(f"row {i}: runs must be non-empty and contiguous from 0, got {runs}")
                    pos = end
                if pos != self.seq_len:
                    raise ValueError(f"row {i}: runs cover [0, {pos}) but seq_len is {self.seq_len}")

    @classmethod
    def plain(cls, seq_len: int, *, causal: bool = True) -> "SequenceLayout":
        """One segment per row: causal LM, or full (bidirectional) attention."""
        return cls(seq_len=seq_len, causal=causal)

    @classmethod
    def from_segments(cls, segment_ids: torch.Tensor, *, seq_len: Optional[int] = None, causal: bool = True,
                      shared_segment: Optional[int] = 0, pad_segment: int = -1) -> "SequenceLayout":
        """From global per-position segment ids ``[rows, S]`` (host tensor; padded to ``seq_len`` with
        ``pad_segment``)."""
        s = segment_ids.shape[1] if seq_len is None else seq_len
        if s < segment_ids.shape[1]:
            raise ValueError(f"seq_len={s} is shorter than the segment ids ({segment_ids.shape[1]})")
        return cls(seq_len=s, rows=_rows_from_tensor(segment_ids, s, pad_segment), causal=causal,
                   shared_segment=shared_segment)

    @property
    def num_rows(self) -> Optional[int]:
        return None if self.rows is None else len(self.rows)

    def row_groups(self, batch: int) -> list[tuple[slice, tuple[Run, ...]]]:
        """Consecutive rows with identical runs, as ``(row slice, runs)``: each group shares its tiles."""
        if self.rows is None:
            return [(slice(0, batch), ((0, self.seq_len, 0),))]
        if len(self.rows) != batch:
            raise ValueError(f"the layout describes {len(self.rows)} rows but the batch has {batch}")
        groups: list[tuple[slice, tuple[Run, ...]]] = []
        start = 0
        for i in range(1, batch + 1):
            if i == batch or self.rows[i] != self.rows[start]:
                groups.append((slice(start, i), self.rows[start]))
                start = i
        return groups

    def segment_ids(self, row: int = 0) -> torch.Tensor:
        """``[seq_len]`` segment id of every position of ``row`` (tests and the dense oracle)."""
        runs = ((0, self.seq_len, 0),) if self.rows is None else self.rows[row]
        out = torch.empty(self.seq_len, dtype=torch.long)
        for start, end, seg in runs:
            out[start:end] = seg
        return out

    def cached_plan(self, key, build):
        """The plan for ``key``, built once per layout (every layer of a forward shares it)."""
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = build()
        return plan


def rank_chunks(local_len: int, cp_size: int, cp_rank: int, local_offset: int = 0) -> tuple[Chunk, ...]:
    """The global chunks CP rank ``cp_rank`` holds in its ``local_len`` tokens (zigzag order)."""
    if cp_size == 1:
        return ((0, local_len, local_offset),)
    if local_len % 2:
        raise ValueError(
            f"context parallelism needs an even local sequence length (2 chunks per rank), got {local_len}; "
            f"pad the global sequence to a multiple of 2 x context_parallel_size"
        )
    c = local_len // 2
    return ((cp_rank * c, c, local_offset), ((2 * cp_size - 1 - cp_rank) * c, c, local_offset + c))


def gathered_chunks(local_len: int, cp_size: int) -> tuple[Chunk, ...]:
    """Chunks of the rank-major concatenation of every CP rank's local tokens."""
    return tuple(ch for r in range(cp_size) for ch in rank_chunks(local_len, cp_size, r, r * local_len))
