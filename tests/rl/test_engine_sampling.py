"""SamplingConfig validation, response trimming and the engine factory (no model, no processes)."""

from __future__ import annotations

import pytest
import torch

from megatron_longvideo.rl.engines import SamplingConfig, build_engine
from megatron_longvideo.rl.engines.base import check_prompt_embeds
from megatron_longvideo.rl.engines.hf_engine import trim_completion


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
    ("max_new_tokens", 0), ("n", 0), ("stop", [""]), ("stop_token_ids", [-1]), ("seed", -3),
])
def test_invalid_sampling_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingConfig(**{field: value})


def test_sampling_config_defaults_and_rank_seeds():
    s = SamplingConfig(stop=["a"], stop_token_ids=[2], seed=10, temperature=0)
    assert s.stop == ("a",) and s.stop_token_ids == (2,) and s.greedy
    assert s.for_rank(3).seed == 13 and SamplingConfig().for_rank(3).seed is None
    with pytest.raises(Exception):
        s.n = 2  # frozen


class _CharTokenizer:
    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)


def test_trim_completion():
    assert trim_completion([5, 6, 7], SamplingConfig()) == (3, "length")
    assert trim_completion([5, 6, 7, 6], SamplingConfig(stop_token_ids=[6])) == (2, "stop")
    # "cd" is completed by the 4th token (ids 2, 3 -> "c", "d")
    assert trim_completion([0, 1, 2, 3, 4], SamplingConfig(stop=["cd"]), _CharTokenizer()) == (4, "stop")


def test_prompt_checks_and_factory():
    with pytest.raises(ValueError, match="at least one prompt"):
        check_prompt_embeds([], 8)
    with pytest.raises(ValueError, match=r"prompt_embeds\[0\]: expected floating-point"):
        check_prompt_embeds([torch.ones(2, 8, dtype=torch.long)], 8)
    with pytest.raises(ValueError, match="engine: must be one of"):
        build_engine("sglang", None)
