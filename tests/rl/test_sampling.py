"""DAPO dynamic sampling: which groups are dropped and how many prompts are drawn next."""

import pytest
import torch

from megatron_longvideo.rl.sampling import DynamicSampler, DynamicSamplingConfig, filter_groups

MIXED = [1.0, 0.0, 1.0, 0.0]
ALL_ONE = [1.0, 1.0, 1.0, 1.0]
ALL_ZERO = [0.0, 0.0, 0.0, 0.0]


def test_filter_groups():
    rewards = torch.tensor([MIXED, ALL_ONE, ALL_ZERO, [0.5, 0.5, 0.5, 0.6]])
    assert filter_groups(rewards).tolist() == [True, False, False, True]
    assert filter_groups(rewards, tol=0.2).tolist() == [True, False, False, False]


def test_refill_rounds_until_full():
    sampler = DynamicSampler(DynamicSamplingConfig(num_target_groups=4, max_rounds=3))
    assert sampler.num_to_draw() == 4
    # Round 1: 4 groups, 2 degenerate -> 2 kept, 2 missing.
    assert sampler.add(["p0", "p1", "p2", "p3"], torch.tensor([MIXED, ALL_ONE, MIXED, ALL_ZERO])) == 2
    # Round 2: 2 groups, 1 degenerate -> 3 kept, 1 missing.
    assert sampler.add(["p4", "p5"], torch.tensor([ALL_ONE, MIXED])) == 1
    # Round 3: 1 group kept -> full.
    assert sampler.add(["p6"], torch.tensor([MIXED])) == 0
    batch, stats = sampler.take()
    assert batch == ["p0", "p2", "p5", "p6"]
    assert (stats.num_rounds, stats.num_generated_groups, stats.num_dropped_groups) == (3, 7, 3)
    assert (stats.num_overflow_groups, stats.num_missing_groups) == (0, 0)
    assert sampler.num_to_draw() == 4  # take() reset the buffer


def test_oversample_and_overflow():
    sampler = DynamicSampler(DynamicSamplingConfig(num_target_groups=4, oversample=1.5))
    assert sampler.num_to_draw() == 6  # ceil(4 * 1.5)
    # 6 groups, 3 kept -> 1 missing -> ceil(1 * 1.5) = 2 prompts.
    rewards = torch.tensor([MIXED, ALL_ONE, MIXED, ALL_ZERO, MIXED, ALL_ONE])
    assert sampler.add(list("abcdef"), rewards) == 2
    # 2 more kept -> 5 kept for a target of 4: one overflows and is discarded.
    assert sampler.add(list("gh"), torch.tensor([MIXED, MIXED])) == 0
    batch, stats = sampler.take()
    assert batch == ["a", "c", "e", "g"]
    assert (stats.num_generated_groups, stats.num_dropped_groups, stats.num_overflow_groups) == (8, 3, 1)


def test_max_rounds_caps_refills_and_reports_missing():
    sampler = DynamicSampler(DynamicSamplingConfig(num_target_groups=3, max_rounds=2))
    assert sampler.add(list("abc"), torch.tensor([ALL_ONE, ALL_ZERO, MIXED])) == 2
    assert sampler.add(list("de"), torch.tensor([ALL_ONE, ALL_ONE])) == 0  # rounds spent
    with pytest.raises(RuntimeError, match="take"):
        sampler.add(["f"], torch.tensor([MIXED]))
    batch, stats = sampler.take()
    assert batch == ["c"]
    assert (stats.num_rounds, stats.num_dropped_groups, stats.num_missing_groups) == (2, 4, 2)


def test_single_round_filters_without_refill():
    sampler = DynamicSampler(DynamicSamplingConfig(num_target_groups=2, max_rounds=1))
    assert sampler.add(["a", "b"], torch.tensor([MIXED, ALL_ONE])) == 0
    assert sampler.take()[0] == ["a"]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_target_groups=0), "num_target_groups"),
        (dict(num_target_groups=2, max_rounds=0), "max_rounds"),
        (dict(num_target_groups=2, oversample=0.5), "oversample"),
        (dict(num_target_groups=2, tol=-0.1), "tol"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DynamicSamplingConfig(**kwargs)


def test_add_checks_shapes():
    sampler = DynamicSampler(DynamicSamplingConfig(num_target_groups=2))
    with pytest.raises(ValueError, match="rewards"):
        sampler.add(["a", "b"], torch.tensor([MIXED]))
