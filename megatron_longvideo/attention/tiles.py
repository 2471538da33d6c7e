"""Tiles: the non-empty blocks of an attention pattern, each one fused kernel call.

A :class:`Tile` is a query range and a key range of a rank's *local* tensors, either ``full`` (every
query sees every key) or ``causal`` (square; local query ``q0 + i`` sees keys ``k0 .. k0 + i``, the
diagonal of one contiguous piece of the sequence). :func:`plan_tiles` derives, from a
:class:`~megatron_longvideo.attention.layout.SequenceLayout` and where the queries and keys live
(:data:`~megatron_longvideo.attention.layout.Chunk` lists), tiles that cover every visible
(query, key) pair exactly once and nothing else: fully masked blocks are never computed, and no
``[sq, sk]`` mask exists anywhere.

How: the query chunks are cut at segment boundaries into *pieces*. A query piece of segment ``s``
at global ``[a, b)`` sees the runs of segment ``s`` and of the shared segment, cut at ``b`` when
causal; the part of its own run before ``a`` is full, ``[a, b)`` itself is the causal diagonal. Each
visible global interval is then mapped onto the key chunks that hold it. Finally, full tiles that
touch are merged (adjacent key ranges for the same queries, then adjacent query ranges for the same
keys) so that, for example, all G packed responses attend to the prefix in one call.
Cost: ``O(pieces x log(chunks))`` per row, in Python ints, once per forward (cached on the layout).
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Optional, Sequence

from megatron_longvideo.attention.layout import Chunk, Run, SequenceLayout

__all__ = ["Tile", "TilePlan", "plan_tiles", "tiles_for_row"]


@dataclasses.dataclass(frozen=True, order=True)
class Tile:
    """Local query rows ``[q0, q1)`` against local key rows ``[k0, k1)``; ``causal`` tiles are square."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool = False

    @property
    def pairs(self) -> int:
        """Visible (query, key) pairs: the work of the tile."""
        n = self.q1 - self.q0
        return n * (n + 1) // 2 if self.causal else n * (self.k1 - self.k0)


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """Tiles per group of rows that share a layout: ``((row slice, tiles), ...)``."""

    groups: tuple[tuple[slice, tuple[Tile, ...]], ...]
    num_queries: int
    """Local query length the plan was made for."""
    num_keys: int
    """Local key length."""

    @property
    def num_calls(self) -> int:
        return sum(len(tiles) for _, tiles in self.groups)

    def pairs(self) -> int:
        """Visible (query, key) pairs over all rows: what the kernels compute."""
        return sum((rows.stop - rows.start) * sum(t.pairs for t in tiles) for rows, tiles in self.groups)

    def is_empty(self) -> bool:
        return self.num_calls == 0


def _pieces(chunks: Sequence[Chunk], runs: Sequence[Run], starts: list[int]):
    """Chunks cut at run boundaries: ``(global_start, global_end, local_start, segment)``."""
    out = []
    for g, n, local in chunks:
        end = g + n
        i = bisect.bisect_right(starts, g) - 1
        pos = g
        while pos < end:
            r_start, r_end, seg = runs[i]
            stop = min(end, r_end)
            out.append((pos, stop, local + pos - g, seg))
            pos = stop
            i += 1
    return out


def _merge_full(tiles: list[Tile]) -> list[Tile]:
    """Merge full tiles that touch: same queries and adjacent keys, then same keys and adjacent queries."""
    causal = [t for t in tiles if t.causal]
    full = [t for t in tiles if not t.causal]
    while True:
        before = len(full)
        for axis in ("k", "q"):
            by: dict[tuple[int, int], list[Tile]] = {}
            for t in full:
                by.setdefault((t.q0, t.q1) if axis == "k" else (t.k0, t.k1), []).append(t)
            merged = []
            for group in by.values():
                group.sort(key=(lambda t: t.k0) if axis == "k" else (lambda t: t.q0))
                cur = group[0]
                for t in group[1:]:
                    if axis == "k" and t.k0 == cur.k1:
                        cur = Tile(cur.q0, cur.q1, cur.k0, t.k1)
                    elif axis == "q" and t.q0 == cur.q1:
                        cur = Tile(cur.q0, t.q1, cur.k0, cur.k1)
                    else:
                        merged.append(cur)
                        cur = t
                merged.append(cur)
            full = merged
        if len(full) == before:
            break
    return sorted(causal + full)


def tiles_for_row(runs: Sequence[Run], q_chunks: Sequence[Chunk], k_chunks: Sequence[Chunk], *,
                  causal: bool, shared_segment: Optional[int]) -> tuple[Tile, ...]:
    """The tiles of one row (see module docstring). ``runs`` cover the global sequence in order."""
    starts = [r[0] for r in runs]
    by_segment: dict[int, list[tuple[int, int]]] = {}
    for start, end, seg in runs:
        by_segment.setdefault(seg, []).append((start, end))
    keys = sorted(k_chunks)
    k_starts = [k[0] for k in keys]
    for (g0, n0, _), (g1, _, _) in zip(keys, keys[1:]):
        if g0 + n0 > g1:
            raise ValueError(f"key chunks overlap: {keys}")

    def key_overlaps(x: int, y: int):
        """(global start, global end, local start) of each key chunk part inside [x, y)."""
        i = max(bisect.bisect_right(k_starts, x) - 1, 0)
        while i < len(keys) and keys[i][0] < y:
            g, n, local = keys[i]
            a, b = max(x, g), min(y, g + n)
            if a < b:
                yield a, b, local + a - g
            i += 1

    tiles: list[Tile] = []
    for a, b, q_local, seg in _pieces(q_chunks, runs, starts):
        q0, q1 = q_local, q_local + b - a
        visible = list(by_segment.get(seg, ()))
        if shared_segment is not None and shared_segment != seg:
            visible += by_segment.get(shared_segment, [])
        for x, y in visible:
            if not causal:
                tiles.extend(Tile(q0, q1, k, k + e - s) for s, e, k in key_overlaps(x, y))
                continue
            # before the piece: full; the piece itself: the causal diagonal; after it: hidden
            for s, e, k in key_overlaps(x, min(y, a)):
                tiles.append(Tile(q0, q1, k, k + e - s))
            for s, e, k in key_overlaps(max(x, a), min(y, b)):
                # keys [s, e) of the diagonal: queries [s, e) see them causally, queries after e see all
                tiles.append(Tile(q0 + s - a, q0 + e - a, k, k + e - s, causal=True))
                if e < b:
                    tiles.append(Tile(q0 + e - a, q1, k, k + e - s))
    return tuple(_merge_full(tiles))


def plan_tiles(layout: SequenceLayout, batch: int, q_chunks: Sequence[Chunk], k_chunks: Sequence[Chunk]) -> TilePlan:
    """Tiles for every row group of ``layout`` with queries in ``q_chunks`` and keys in ``k_chunks``."""
    q_chunks, k_chunks = tuple(q_chunks), tuple(k_chunks)
    num_q = sum(n for _, n, _ in q_chunks)
    num_k = sum(n for _, n, _ in k_chunks)
    for what, chunks in (("query", q_chunks), ("key", k_chunks)):
        for g, n, _ in chunks:
            if g < 0 or n < 1 or g + n > layout.seq_len:
                raise ValueError(f"{what} chunk {(g, n)} is outside the layout's sequence [0, {layout.seq_len})")
    memo: dict[tuple[Run, ...], tuple[Tile, ...]] = {}
    groups = []
    for rows, runs in layout.row_groups(batch):
        if runs not in memo:
            memo[runs] = tiles_for_row(runs, q_chunks, k_chunks, causal=layout.causal,
                                       shared_segment=layout.shared_segment)
        if memo[runs]:
            groups.append((rows, memo[runs]))
    return TilePlan(groups=tuple(groups), num_queries=num_q, num_keys=num_k)
