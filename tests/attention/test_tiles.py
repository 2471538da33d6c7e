"""The tile planner: tiles cover every visible (query, key) pair exactly once, and nothing else.

Checked against the dense mask (built independently, position by position) on random layouts: prefix
lengths, segment counts, padding, CP sizes 1/2/4, and the three query/key placements the CP modes use
(all_gather: own chunks vs gathered; a2a: gathered vs gathered; p2p: own chunks vs one rank's chunks).
"""

from __future__ import annotations

import random

import pytest
import torch

from megatron_longvideo.attention.dense import chunk_index, visible_mask
from megatron_longvideo.attention.layout import SequenceLayout, gathered_chunks, rank_chunks, runs_from_segments
from megatron_longvideo.attention.tiles import Tile, plan_tiles


def random_packed_segments(rng: random.Random, seq_len: int, rows: int) -> torch.Tensor:
    """``[rows, seq_len]`` segment ids: a prefix (0), 1-5 responses (1..G), then padding (-1)."""
    out = torch.full((rows, seq_len), -1, dtype=torch.long)
    for r in range(rows):
        pos = rng.randint(1, seq_len // 2)
        out[r, :pos] = 0
        for g in range(1, rng.randint(1, 5) + 1):
            if pos >= seq_len - 1:
                break
            n = rng.randint(1, max(1, (seq_len - pos) // 3))
            out[r, pos : pos + n] = g
            pos += n
    return out


def placements(seq_len: int, cp: int):
    """(name, query chunks, key chunks) of every CP mode and rank for a global length ``seq_len``."""
    s_local = seq_len // cp
    for r in range(cp):
        yield f"all_gather r{r}", rank_chunks(s_local, cp, r), gathered_chunks(s_local, cp)
        for t in range(cp):
            yield f"p2p r{r} step{t}", rank_chunks(s_local, cp, r), rank_chunks(s_local, cp, (r - t) % cp)
    yield "a2a", gathered_chunks(s_local, cp), gathered_chunks(s_local, cp)


def coverage(plan, batch: int, sq: int, sk: int) -> torch.Tensor:
    """``[batch, sq, sk]`` how many tiles cover each pair."""
    count = torch.zeros(batch, sq, sk, dtype=torch.long)
    for rows, tiles in plan.groups:
        for t in tiles:
            block = torch.ones(t.q1 - t.q0, t.k1 - t.k0, dtype=torch.long)
            if t.causal:
                assert t.q1 - t.q0 == t.k1 - t.k0, f"causal tile not square: {t}"
                block = block.tril()
            count[rows, t.q0 : t.q1, t.k0 : t.k1] += block
    return count


def check_exact(layout: SequenceLayout, batch: int, q_chunks, k_chunks, what: str, segments=None):
    plan = plan_tiles(layout, batch, q_chunks, k_chunks)
    sq, sk = plan.num_queries, plan.num_keys
    for _, tiles in plan.groups:
        assert all(t.q1 > t.q0 and t.k1 > t.k0 for t in tiles), f"{what}: empty tile in {tiles}"
    got = coverage(plan, batch, sq, sk)
    want = visible_mask(layout, batch, chunk_index(q_chunks), chunk_index(k_chunks), segments)[:, 0].long()
    assert got.max() <= 1, f"{what}: a pair is covered twice"
    assert torch.equal(got, want), f"{what}: tiles cover {int((got != want).sum())} pairs wrongly"
    assert plan.pairs() == int(want.sum())
    return plan


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_random_packed_layouts_are_covered_exactly(cp):
    rng = random.Random(cp)
    for trial in range(12):
        seq_len = 2 * cp * rng.randint(3, 9)  # chunks straddle segment boundaries at random
        rows = rng.randint(1, 3)
        segments = random_packed_segments(rng, seq_len, rows)
        layout = SequenceLayout.from_segments(segments)
        for name, qc, kc in placements(seq_len, cp):
            check_exact(layout, rows, qc, kc, f"trial {trial} {name}", segments)


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_plain_and_bidirectional_layouts(cp):
    seq_len = 8 * cp
    for causal in (True, False):
        layout = SequenceLayout.plain(seq_len, causal=causal)
        for name, qc, kc in placements(seq_len, cp):
            check_exact(layout, 2, qc, kc, f"causal={causal} {name}")


def test_block_diagonal_windows_without_shared_segment():
    # a vision tower's windows: full attention inside each window only
    seg = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4 + [3] * 8])
    layout = SequenceLayout.from_segments(seg, causal=False, shared_segment=None)
    plan = check_exact(layout, 1, rank_chunks(24, 1, 0), rank_chunks(24, 1, 0), "windows", seg)
    assert plan.num_calls == 4


def test_one_call_for_plain_causal_and_merged_prefix_tiles():
    # CP=1 plain causal: exactly the single causal flash call on the whole sequence (the floor)
    plan = plan_tiles(SequenceLayout.plain(64), 3, rank_chunks(64, 1, 0), rank_chunks(64, 1, 0))
    assert plan.groups == ((slice(0, 3), (Tile(0, 64, 0, 64, causal=True),)),)
    # a packed group: the G responses (and the padding) attend the prefix in one merged call
    seg = torch.tensor([[0] * 40 + [1] * 5 + [2] * 7 + [3] * 6 + [-1] * 6])
    layout = SequenceLayout.from_segments(seg)
    plan = plan_tiles(layout, 1, rank_chunks(64, 1, 0), rank_chunks(64, 1, 0))
    tiles = plan.groups[0][1]
    assert Tile(40, 64, 0, 40) in tiles
    assert len(tiles) == 1 + 1 + 4  # prefix diagonal, responses+padding x prefix, 4 own diagonals


def test_rows_with_equal_layouts_share_tiles():
    seg = torch.tensor([[0] * 6 + [1] * 2, [0] * 6 + [1] * 2, [0] * 4 + [1] * 4])
    plan = plan_tiles(SequenceLayout.from_segments(seg), 3, rank_chunks(8, 1, 0), rank_chunks(8, 1, 0))
    assert [rows for rows, _ in plan.groups] == [slice(0, 2), slice(2, 3)]


def test_layout_validation_names_the_problem():
    with pytest.raises(ValueError, match="runs cover"):
        SequenceLayout(seq_len=10, rows=(((0, 4, 0), (4, 8, 1)),))
    with pytest.raises(ValueError, match="contiguous"):
        SequenceLayout(seq_len=8, rows=(((0, 4, 0), (5, 8, 1)),))
    with pytest.raises(ValueError, match="outside the layout"):
        plan_tiles(SequenceLayout.plain(8), 1, ((0, 16, 0),), ((0, 8, 0),))
    with pytest.raises(ValueError, match="describes 1 rows but the batch has 2"):
        plan_tiles(SequenceLayout.from_segments(torch.zeros(1, 8, dtype=torch.long)), 2, ((0, 8, 0),), ((0, 8, 0),))
    with pytest.raises(ValueError, match="even local sequence length"):
        rank_chunks(7, 2, 0)
    assert runs_from_segments([0, 0, 1, 1, 1, -1]) == ((0, 2, 0), (2, 5, 1), (5, 6, -1))
