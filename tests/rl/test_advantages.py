"""Advantages (GRPO, Dr.GRPO, RLOO, REINFORCE++) and DAPO's overlong penalty against hand-computed values."""

import pytest
import torch

from megatron_longvideo.rl.advantages import (
    batch_moments,
    batch_normalize,
    compute_advantages,
    degenerate_groups,
    group_advantages,
    overlong_penalty,
)


def test_grpo_unbiased_std_by_hand():
    # Group [1, 0, 0, 1]: mean 0.5, deviations +-0.5, unbiased var = 4 * 0.25 / 3 = 1/3,
    #   std = 0.5773503 -> A = +-0.5 / 0.5773503 = +-0.8660254.
    # Group [1, 0, 0, 0]: mean 0.25, deviations 0.75, -0.25 x3,
    #   unbiased var = (0.5625 + 3 * 0.0625) / 3 = 0.25, std = 0.5 -> A = 1.5, -0.5, -0.5, -0.5.
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([[0.8660254, -0.8660254, -0.8660254, 0.8660254], [1.5, -0.5, -0.5, -0.5]])
    torch.testing.assert_close(group_advantages(rewards, eps=0.0), expected)
    # eps = 1e-6 is added to std: relative change ~2e-6.
    torch.testing.assert_close(group_advantages(rewards), expected, rtol=1e-5, atol=0)


def test_grpo_biased_std_by_hand():
    # [1, 0, 0, 1]: biased var 0.25, std 0.5 -> +-1.
    # [1, 0, 0, 0]: biased var = 0.75 / 4 = 0.1875, std = 0.4330127 -> 0.75 / std = 1.7320508, -0.25 / std = -0.5773503.
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([[1.0, -1.0, -1.0, 1.0], [1.7320508, -0.5773503, -0.5773503, -0.5773503]])
    torch.testing.assert_close(group_advantages(rewards, unbiased=False, eps=0.0), expected)


def test_dr_grpo_is_mean_centred_only():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 0.0, 1.0, 1.0]])
    # means 0.25 and 1.0
    expected = torch.tensor([[0.75, -0.25, -0.25, -0.25], [1.0, -1.0, 0.0, 0.0]])
    torch.testing.assert_close(group_advantages(rewards, scale="none"), expected)


def test_zero_std_groups_get_exactly_zero():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.1, 0.1, 0.1], [0.7, 0.7, 0.7], [1.0, 0.0, 1.0]])
    for scale in ("std", "none"):
        adv = group_advantages(rewards, scale=scale)
        assert torch.equal(adv[:3], torch.zeros(3, 3)), scale
        assert adv[3].abs().min() > 0, scale
    # Equal within tol also counts as degenerate.
    near = torch.tensor([[1.0, 1.0 + 1e-9, 1.0]], dtype=torch.float64)
    assert torch.equal(group_advantages(near, tol=1e-6), torch.zeros(1, 3, dtype=torch.float64))
    # Without tol (and eps = 0) a 1e-9 wobble is scaled up to order one: [1, 1 + d, 1] has deviations
    # (-d/3, 2d/3, -d/3) and unbiased std d/sqrt(3), so A = (-0.5774, 1.1547, -0.5774) for any d.
    torch.testing.assert_close(
        group_advantages(near, tol=0.0, eps=0.0),
        torch.tensor([[-0.5773503, 1.1547005, -0.5773503]], dtype=torch.float64),
        rtol=1e-5,
        atol=0,
    )
    torch.testing.assert_close(degenerate_groups(rewards), torch.tensor([True, True, True, False]))


def test_flat_rewards_with_group_size():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    adv = group_advantages(rewards, group_size=4, eps=0.0)
    assert adv.shape == (8,)
    torch.testing.assert_close(adv, group_advantages(rewards.view(2, 4), eps=0.0).view(8))
    torch.testing.assert_close(adv[4:], torch.tensor([1.5, -0.5, -0.5, -0.5]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rewards=torch.zeros(6), group_size=4), "group_size"),
        (dict(rewards=torch.zeros(6)), "group_size"),
        (dict(rewards=torch.zeros(2, 3), group_size=2), "rewards"),
        (dict(rewards=torch.zeros(2, 3, 1)), "rewards"),
        (dict(rewards=torch.zeros(2, 3), scale="rank"), "scale"),
        (dict(rewards=torch.zeros(2, 3), eps=-1.0), "eps"),
        (dict(rewards=torch.zeros(2, 3), tol=-1.0), "tol"),
        (dict(rewards=torch.zeros(3, 1)), "group_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    rewards = kwargs.pop("rewards")
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, **kwargs)


# ---------------------------------------------------------------------------------------------- #
# compute_advantages: RLOO, REINFORCE++ with baseline


def test_compute_advantages_grpo_and_dr_grpo_are_group_advantages():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(5, 4, generator=g)
    torch.testing.assert_close(compute_advantages(rewards), group_advantages(rewards))
    torch.testing.assert_close(compute_advantages(rewards, estimator="dr_grpo"), group_advantages(rewards, scale="none"))
    torch.testing.assert_close(compute_advantages(rewards.view(-1), estimator="grpo", group_size=4, unbiased=False),
                               group_advantages(rewards, unbiased=False).view(-1))


def test_rloo_by_hand_and_leave_one_out_definition():
    # [1, 0, 0, 0]: baselines mean of the others = 0, 1/3, 1/3, 1/3 -> A = 1, -1/3, -1/3, -1/3
    #   (= 4/3 * (r - 0.25)). [2, 0, 1, 1]: baselines 2/3, 4/3, 1, 1 -> A = 4/3, -4/3, 0, 0.
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 0.0, 1.0, 1.0]])
    expected = torch.tensor([[1.0, -1 / 3, -1 / 3, -1 / 3], [4 / 3, -4 / 3, 0.0, 0.0]])
    torch.testing.assert_close(compute_advantages(rewards, estimator="rloo"), expected)
    g = torch.Generator().manual_seed(1)
    rewards = torch.rand(3, 5, generator=g, dtype=torch.float64)
    loo = torch.stack([rewards[:, i] - torch.cat([rewards[:, :i], rewards[:, i + 1:]], dim=1).mean(dim=1)
                       for i in range(5)], dim=1)
    torch.testing.assert_close(compute_advantages(rewards, estimator="rloo"), loo)
    torch.testing.assert_close(compute_advantages(rewards.view(-1), estimator="rloo", group_size=5), loo.view(-1))


def test_reinforce_pp_by_hand():
    # Groups [1, 0] and [3, 1]: baselined B = [0.5, -0.5], [1, -1]; batch mean 0, sum of squares 2.5.
    #   unbiased std = sqrt(2.5 / 3) = 0.9128709 -> A = B / std = +-0.5477226, +-1.0954451
    #   biased std   = sqrt(2.5 / 4) = 0.7905694 -> A = +-0.6324555, +-1.2649111
    rewards = torch.tensor([[1.0, 0.0], [3.0, 1.0]])
    expected = torch.tensor([[0.5477226, -0.5477226], [1.0954451, -1.0954451]])
    torch.testing.assert_close(compute_advantages(rewards, estimator="reinforce_pp", eps=0.0), expected)
    expected = torch.tensor([[0.6324555, -0.6324555], [1.2649111, -1.2649111]])
    torch.testing.assert_close(compute_advantages(rewards, estimator="reinforce_pp", eps=0.0, unbiased=False), expected)


def test_reinforce_pp_halves_with_combined_statistics_equal_the_whole_batch():
    """Two data-parallel ranks with 2 and 4 groups: their moments summed (by an in-place all-reduce, or
    precomputed) give the whole batch's advantages on each rank's own groups."""
    g = torch.Generator().manual_seed(2)
    rewards = torch.rand(6, 4, generator=g)
    rewards[3] = 0.5  # a degenerate group: exactly zero
    whole = compute_advantages(rewards, estimator="reinforce_pp")
    assert torch.equal(whole[3], torch.zeros(4))
    halves = [rewards[:2], rewards[2:]]
    local = [batch_moments(compute_advantages(h, estimator="dr_grpo")) for h in halves]

    def all_reduce_for(rank):
        def all_reduce(t):  # sums the other rank's moments in, in place, like torch.distributed.all_reduce
            t.add_(local[1 - rank])
        return all_reduce

    by_all_reduce = [compute_advantages(h, estimator="reinforce_pp", all_reduce=all_reduce_for(r))
                     for r, h in enumerate(halves)]
    torch.testing.assert_close(torch.cat(by_all_reduce), whole)
    by_moments = [compute_advantages(h, estimator="reinforce_pp", global_moments=local[0] + local[1]) for h in halves]
    torch.testing.assert_close(torch.cat(by_moments), whole)
    # one rank alone is normalised by its own statistics: different
    assert not torch.allclose(compute_advantages(halves[0], estimator="reinforce_pp"), whole[:2])


def test_batch_normalize_and_moments():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])  # mean 3, unbiased var (4 + 1 + 0 + 9) / 3 = 14/3
    torch.testing.assert_close(batch_moments(x), torch.tensor([4.0, 12.0, 50.0], dtype=torch.float64))
    std = (14 / 3) ** 0.5
    torch.testing.assert_close(batch_normalize(x, eps=0.0), (x - 3) / std)
    assert torch.equal(batch_normalize(torch.full((3,), 2.0)), torch.zeros(3))  # zero variance
    assert batch_normalize(torch.zeros(0)).shape == (0,)


def test_all_groups_degenerate_gives_zero_for_every_estimator():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.2, 0.2, 0.2]])
    for estimator in ("grpo", "dr_grpo", "rloo", "reinforce_pp"):
        assert torch.equal(compute_advantages(rewards, estimator=estimator), torch.zeros(2, 3)), estimator


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(estimator="ppo"), "estimator"),
        (dict(estimator="rloo", rewards=torch.zeros(3, 1)), "group_size"),
        (dict(estimator="rloo", rewards=torch.zeros(6), group_size=4), "group_size"),
        (dict(estimator="rloo", eps=-1.0), "eps"),
        (dict(estimator="grpo", global_moments=torch.ones(3)), "global_moments"),
        (dict(estimator="rloo", all_reduce=lambda t: None), "global_moments"),
        (dict(estimator="reinforce_pp", global_moments=torch.ones(3), all_reduce=lambda t: None), "global_moments"),
        (dict(estimator="reinforce_pp", global_moments=torch.ones(4)), "global_moments"),
        (dict(estimator="reinforce_pp", global_moments=torch.tensor([1.0, 0.0, 0.0])), "global_moments"),
    ],
)
def test_compute_advantages_bad_arguments(kwargs, match):
    rewards = kwargs.pop("rewards", torch.rand(2, 3))
    with pytest.raises(ValueError, match=match):
        compute_advantages(rewards, **kwargs)


# ---------------------------------------------------------------------------------------------- #
# DAPO overlong penalty


def test_overlong_penalty_boundaries():
    # L_max = 100, L_cache = 20: 0 up to 80, then (80 - L) / 20 down to -1 at 100, -1 beyond.
    lengths = torch.tensor([0, 79, 80, 81, 90, 99, 100, 101, 150])
    expected = torch.tensor([0.0, 0.0, 0.0, -0.05, -0.5, -0.95, -1.0, -1.0, -1.0])
    torch.testing.assert_close(overlong_penalty(lengths, 100, 20), expected)
    torch.testing.assert_close(overlong_penalty(lengths.tolist(), 100, 20, factor=0.5), 0.5 * expected)
    # buffer 0: a hard cut at L_max; buffer = L_max: a ramp from length 0
    torch.testing.assert_close(overlong_penalty([99, 100, 101], 100, 0), torch.tensor([0.0, 0.0, -1.0]))
    torch.testing.assert_close(overlong_penalty([0, 50, 100, 101], 100, 100), torch.tensor([0.0, -0.5, -1.0, -1.0]))
    out = overlong_penalty(torch.tensor([[90.0, 10.0]], dtype=torch.float64), 100, 20)
    assert out.dtype == torch.float64 and out.shape == (1, 2)
    for kwargs, match in [(dict(max_len=0, buffer=0), "max_len"), (dict(max_len=10, buffer=11), "buffer"),
                          (dict(max_len=10, buffer=-1), "buffer"), (dict(max_len=10, buffer=2, factor=-1.0), "factor")]:
        with pytest.raises(ValueError, match=match):
            overlong_penalty([1], **kwargs)
