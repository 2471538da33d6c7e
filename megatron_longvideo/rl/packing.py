"""Build prefill batches for groups of responses: separate sequences or shared-prefix packing.

A group is one prompt (video + question tokens, the *prefix*) and its G sampled responses.

* Separate (``pack=False``): one row ``[prefix | r_k]`` per response, the prefix repeated G times.
* Packed (``pack=True``): one row ``[prefix | r_1 | ... | r_G]`` per group. Segment ids (0 for the
  prefix, k for response k) make each response attend to the prefix and to itself only, and its RoPE
  positions restart at ``len(prefix)``, so every response sees exactly what it sees alone while the
  prefix is computed once.

Both give the same *targets*, in the same order (group, response, token): for each response token
the flat row-major position (``row * S + position``) whose output predicts it and the token id.
A response's first token is predicted by the last prefix position, which in a packed row serves all
G responses. Results of the two layouts are therefore directly comparable, token for token.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

__all__ = ["PrefillBatch", "build_prefill_batch"]

_HOST = "cpu"  # batches are index data built on the host; the prefill moves what it needs to the device once


@dataclasses.dataclass
class PrefillBatch:
    """Token rows, their layout, and the next-token predictions a pass needs."""

    input_ids: torch.Tensor
    """``[rows, S]`` token ids, right-padded with the pad id."""
    position_ids: torch.Tensor
    """``[rows, S]`` RoPE positions."""
    segment_ids: torch.Tensor | None
    """``[rows, S]`` packed-response segments (0 prefix, k response k, -1 padding); None unpacked."""
    seq_lens: torch.Tensor
    """``[rows]`` real (unpadded) length of each row."""
    prefix_lens: torch.Tensor
    """``[rows]`` prefix length of each row: only there can a token be a video placeholder (a sampled
    response may contain the placeholder id; it is then an ordinary token)."""
    sources: torch.Tensor
    """``[n]`` flat index ``row * S + position`` of the output that predicts each target."""
    targets: torch.Tensor
    """``[n]`` target token ids."""
    response_index: torch.Tensor
    """``[n]`` which response (0..num_responses-1, group-major) each target belongs to."""
    row_group: list[int]
    """Group of each row (selects the row's videos)."""
    num_responses: int
    """Total responses in the batch."""

    @property
    def num_targets(self) -> int:
        return int(self.targets.numel())

    @property
    def response_lengths(self) -> torch.Tensor:
        """``[num_responses]`` tokens per response."""
        return torch.bincount(self.response_index, minlength=self.num_responses)


def build_prefill_batch(
    prefixes: Sequence[torch.Tensor],
    responses: Sequence[Sequence[torch.Tensor]],
    *,
    pack: bool,
    pad_id: int,
) -> PrefillBatch:
    """Rows and targets for ``prefixes[g]`` (``[P_g]`` ids) and their ``responses[g]`` (``[R_gk]`` ids)."""
    if len(prefixes) != len(responses):
        raise ValueError(f"got {len(prefixes)} prefixes but {len(responses)} response groups")
    rows, positions, segments, row_group, prefix_lens = [], [], [], [], []
    sources, targets, owners = [], [], []
    response_id = 0
    for g, (prefix, group) in enumerate(zip(prefixes, responses)):
        prefix, group = prefix.cpu(), [r.cpu() for r in group]
        p = int(prefix.numel())
        if p == 0:
            raise ValueError(f"group {g}: empty prefix (the first response token needs a prefix position to predict it)")
        if not group:
            raise ValueError(f"group {g}: no responses")
        for k, r in enumerate(group):
            if r.dim() != 1 or r.numel() == 0:
                raise ValueError(f"group {g} response {k}: expected a non-empty 1-D id tensor, got shape {tuple(r.shape)}")
        if pack:
            row = len(rows)
            parts, pos, seg = [prefix], [torch.arange(p, device=_HOST)], [torch.zeros(p, dtype=torch.long, device=_HOST)]
            start = p
            for k, r in enumerate(group):
                n = r.numel()
                parts.append(r)
                pos.append(torch.arange(p, p + n, device=_HOST))
                seg.append(torch.full((n,), k + 1, dtype=torch.long, device=_HOST))
                src = torch.cat([torch.tensor([p - 1], device=_HOST), torch.arange(start, start + n - 1, device=_HOST)])
                sources.append((row, src))
                targets.append(r)
                owners.append(torch.full((n,), response_id, dtype=torch.long, device=_HOST))
                response_id += 1
                start += n
            rows.append(torch.cat(parts))
            prefix_lens.append(p)
            positions.append(torch.cat(pos))
            segments.append(torch.cat(seg))
            row_group.append(g)
        else:
            for r in group:
                row = len(rows)
                n = r.numel()
                rows.append(torch.cat([prefix, r]))
                prefix_lens.append(p)
                positions.append(torch.arange(p + n, device=_HOST))
                sources.append((row, torch.arange(p - 1, p + n - 1, device=_HOST)))
                targets.append(r)
                owners.append(torch.full((n,), response_id, dtype=torch.long, device=_HOST))
                response_id += 1
                row_group.append(g)
    seq = max(int(r.numel()) for r in rows)
    num_rows = len(rows)
    input_ids = torch.full((num_rows, seq), pad_id, dtype=torch.long, device=_HOST)
    position_ids = torch.zeros((num_rows, seq), dtype=torch.long, device=_HOST)
    segment_ids = torch.full((num_rows, seq), -1, dtype=torch.long, device=_HOST) if pack else None
    for i, r in enumerate(rows):
        input_ids[i, : r.numel()] = r
        position_ids[i, : r.numel()] = positions[i]
        if pack:
            segment_ids[i, : r.numel()] = segments[i]
    flat_sources = torch.cat([row * seq + src for row, src in sources])
    return PrefillBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        segment_ids=segment_ids,
        seq_lens=torch.tensor([r.numel() for r in rows], device=_HOST),
        prefix_lens=torch.tensor(prefix_lens, device=_HOST),
        sources=flat_sources,
        targets=torch.cat(targets).long(),
        response_index=torch.cat(owners),
        row_group=row_group,
        num_responses=response_id,
    )
