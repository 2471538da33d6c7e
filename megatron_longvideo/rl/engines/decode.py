"""Sampling and the decode loop our own engines share (``hf``, ``hf`` with multimodal RoPE, ``megatron``).

**Per-response seeds.** Every response of a step has its own seed (:func:`response_seed`: the step's
base seed, the prompt's index in the step and the response's index in its group) and its own random
stream. A response's tokens therefore depend on its seed and the model only, not on which rank drew
it, beside which other responses, or in what batch: the responses of a step can be divided among any
number of ranks (:func:`~megatron_longvideo.rl.rollout.generate_groups`) and the tokens are the ones
a single rank draws.

**Sampling** draws from the tempered, nucleus-truncated distribution ``p`` by the exponential race: the
token is ``argmax(p / E)`` with ``E`` i.i.d. ``Exp(1)`` from the response's own generator, one draw of
the vocabulary's size per step (what vLLM does for seeded requests); greedy is ``argmax(logits)``.

**The loop** (:func:`decode`): a prompt is prefilled once; its ``k`` responses then decode as a batch of
``k`` rows from that one prefill, until every row has met a stop token or ``max_new_tokens``.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Optional, Sequence

import torch

from megatron_longvideo.rl.engines.base import Completion, SamplingConfig

__all__ = ["mix_seed", "prompt_positions", "response_seed", "group_seeds", "draws_of", "RowSampler", "decode", "trim_completion"]

_SEED_BITS = 63


def mix_seed(*parts) -> int:
    """A 63-bit seed from ``parts`` (ints or strings): nearby inputs give unrelated seeds."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - _SEED_BITS)


def response_seed(base: int, prompt_index: int, response_index: int) -> int:
    """The seed of response ``response_index`` of prompt ``prompt_index`` in a call whose base seed is
    ``base``."""
    return mix_seed(base, prompt_index, response_index)


def group_seeds(sampling: SamplingConfig, prompt_index: int, responses: Sequence[int]) -> list[Optional[int]]:
    """Seeds of the responses ``responses`` of prompt ``prompt_index`` (None each when ``sampling.seed`` is)."""
    if sampling.seed is None:
        return [None] * len(responses)
    return [response_seed(sampling.seed, prompt_index, r) for r in responses]


def draws_of(sampling: SamplingConfig, num_prompts: int,
             seeds: Optional[Sequence[Sequence[Optional[int]]]]) -> list[list[Optional[int]]]:
    """The per-response seeds an engine draws for each of ``num_prompts`` prompts: ``seeds`` as given
    (one entry per response, its count overriding ``sampling.n``), else ``sampling.n`` responses each
    seeded by :func:`response_seed` from ``sampling.seed`` and the prompt's index in the call."""
    if seeds is None:
        return [group_seeds(sampling, i, range(sampling.n)) for i in range(num_prompts)]
    if len(seeds) != num_prompts:
        raise ValueError(f"seeds: {len(seeds)} lists for {num_prompts} prompts")
    out = []
    for i, row in enumerate(seeds):
        row = list(row)
        if not row:
            raise ValueError(f"seeds[{i}]: a prompt needs at least one response")
        if any(s is not None and (not isinstance(s, int) or s < 0) for s in row):
            raise ValueError(f"seeds[{i}]: expected non-negative integers or None, got {row!r}")
        out.append(row)
    return out


def trim_completion(token_ids: Sequence[int], sampling: SamplingConfig, tokenizer: Any = None) -> tuple[int, str]:
    """(length, finish reason) of one generated row: up to and including the first stop token, or the
    token that completes the first stop string; else everything ('length')."""
    ids = list(token_ids)
    end, reason = len(ids), "length"
    stops = set(sampling.stop_token_ids)
    for k, t in enumerate(ids):
        if t in stops:
            end, reason = k + 1, "stop"
            break
    if sampling.stop and tokenizer is not None:
        for k in range(1, end + 1):
            text = tokenizer.decode(ids[:k])
            if any(s in text for s in sampling.stop):
                return k, "stop"
    return end, reason


def prompt_positions(length: int, given: Optional[torch.Tensor], *, mrope: bool,
                     device: torch.device) -> tuple[torch.Tensor, int]:
    """(positions of a one-row prompt of ``length`` tokens, the first response token's position), as every
    engine positions it: plain RoPE 0..L-1 (``[1, L]``; ``given`` refused), next L; multimodal RoPE ``given``
    ``[3, L]`` (default: text positions) as ``[3, 1, L]``, decoding continuing at its largest position + 1."""
    if not mrope:
        if given is not None:
            raise ValueError("positions: a plain-RoPE LLM positions a prompt 0..L-1; got positions")
        return torch.arange(length, device=device)[None], length
    pos = torch.arange(length, device="cpu").expand(3, -1) if given is None else given.cpu()
    if tuple(pos.shape) != (3, length):
        raise ValueError(f"positions: expected [3, {length}] for a prompt of {length} tokens, got {tuple(pos.shape)}")
    return pos.to(device)[:, None], int(pos.max()) + 1


class RowSampler:
    """Next tokens of ``k`` rows, each row from its own generator (seeded, or from torch's global RNG
    when its seed is None)."""

    def __init__(self, sampling: SamplingConfig, seeds: Sequence[Optional[int]], device: torch.device):
        self.sampling = sampling
        self.generators = []
        if not sampling.greedy:
            for s in seeds:
                g = torch.Generator(device=device)
                g.manual_seed(int(torch.randint(0, 2**62, (), device="cpu")) if s is None else s)
                self.generators.append(g)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``[k, V]`` logits -> the tempered, top-p truncated distribution ``[k, V]`` (fp32)."""
        sampling = self.sampling
        probs = torch.softmax(logits.float() / float(sampling.temperature), dim=-1)
        if sampling.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            drop = sorted_probs.cumsum(-1) - sorted_probs > float(sampling.top_p)  # the first token always stays
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
        return probs

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``[k, V]`` -> ``[k]`` token ids."""
        if self.sampling.greedy:
            return logits.argmax(-1)
        probs = self.probs(logits)
        race = torch.empty_like(probs)
        for row, g in enumerate(self.generators):
            race[row].exponential_(generator=g)
        return (probs / race).argmax(-1)


def decode(prefill: Callable[[], torch.Tensor], step: Callable[[torch.Tensor, int], torch.Tensor],
           sampling: SamplingConfig, seeds: Sequence[Optional[int]], *, device: torch.device,
           tokenizer=None) -> list[Completion]:
    """The ``len(seeds)`` responses of one prompt. ``prefill()``: ``[k, V]`` logits after the prompt (its
    cache set up for ``k`` rows); ``step(tokens [k], t)``: ``[k, V]`` logits after feeding the ``t``-th
    generated tokens (t = 0 for the first). Stop tokens end a row (kept as its last token); stop strings
    are applied afterwards (:func:`trim_completion`)."""
    sample = RowSampler(sampling, seeds, device)
    stops = torch.tensor(sorted(set(sampling.stop_token_ids)), dtype=torch.long, device=device)
    k = len(seeds)
    logits = prefill()
    tokens, logps = [], []
    done = torch.zeros(k, dtype=torch.bool, device=device)
    for t in range(sampling.max_new_tokens):
        token = sample(logits)
        tokens.append(token)
        if sampling.logprobs:
            logps.append(torch.log_softmax(logits.float(), -1).gather(-1, token[:, None])[:, 0])
        if stops.numel():
            done |= torch.isin(token, stops)
        if t + 1 == sampling.max_new_tokens or bool(done.all()):
            break
        logits = step(token, t)
    ids = torch.stack(tokens, dim=1).cpu()  # [k, T]
    lp = torch.stack(logps, dim=1).cpu() if sampling.logprobs else None
    out = []
    for r in range(k):
        row = ids[r].tolist()
        end, reason = trim_completion(row, sampling, tokenizer)
        out.append(Completion(token_ids=tuple(row[:end]), finish_reason=reason,
                              logprobs=tuple(lp[r, :end].tolist()) if lp is not None else None))
    return out
