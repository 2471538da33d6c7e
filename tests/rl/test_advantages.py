"""Group-relative advantages against hand-computed values."""

import pytest
import torch

from megatron_longvideo.rl.advantages import degenerate_groups, group_advantages


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
