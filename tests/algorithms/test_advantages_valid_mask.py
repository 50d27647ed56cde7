"""group_relative_advantages with a validity mask: dropped responses leave their group (hand-computed values)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_dispo.algorithms import group_relative_advantages

NUM_GPUS = 0


def test_invalid_member_is_left_out_of_mean_and_std() -> None:
    # valid rewards [1, -1, -1]: mean -1/3, centered [4/3, -2/3, -2/3], population var (16 + 4 + 4) / 27 = 8/9,
    # std 2 sqrt(2) / 3 -> A = [sqrt(2), -1/sqrt(2), -1/sqrt(2)]; the dropped member gets 0.
    rewards = torch.tensor([1.0, -1.0, -1.0, -1.0])
    valid = torch.tensor([True, True, True, False])
    advantages = group_relative_advantages(rewards, 4, valid=valid)
    half_root = 1 / math.sqrt(2)
    torch.testing.assert_close(advantages, torch.tensor([math.sqrt(2), -half_root, -half_root, 0.0]))
    # Counted as a member (no mask) the same rewards give a different mean: -0.5 and A_0 = 1.5 / sqrt(0.75)
    assert group_relative_advantages(rewards, 4)[0].item() == pytest.approx(1.5 / math.sqrt(0.75))


def test_dr_grpo_centres_on_the_valid_mean_only() -> None:
    rewards = torch.tensor([1.0, -1.0, -1.0, 5.0])
    valid = torch.tensor([True, True, True, False])
    torch.testing.assert_close(
        group_relative_advantages(rewards, 4, scale_by_std=False, valid=valid),
        torch.tensor([4 / 3, -2 / 3, -2 / 3, 0.0]),
    )


def test_groups_with_at_most_one_valid_member_or_equal_valid_rewards_are_zero() -> None:
    rewards = torch.tensor(
        [
            *[1.0, -1.0, -1.0, -1.0],  # all but one invalid: nothing to compare against
            *[1.0, 1.0, -1.0, -1.0],  # all invalid
            *[1.0, 1.0, -1.0, -1.0],  # valid rewards equal (the differing ones are dropped)
        ]
    )
    valid = torch.tensor([True, False, False, False, False, False, False, False, True, True, False, False])
    for scale_by_std in (True, False):
        advantages = group_relative_advantages(rewards, 4, scale_by_std=scale_by_std, valid=valid)
        torch.testing.assert_close(advantages, torch.zeros(12), rtol=0, atol=0)


def test_dropping_a_member_equals_the_group_without_it() -> None:
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(5 * 4, generator=generator)
    valid = torch.ones(20, dtype=torch.bool)
    valid[[1, 6, 11, 12, 17]] = False  # one in each of the 5 groups
    masked = group_relative_advantages(rewards, 4, valid=valid)
    smaller = group_relative_advantages(rewards[valid], 3)
    torch.testing.assert_close(masked[valid], smaller)
    assert masked[~valid].eq(0).all()


def test_an_all_true_mask_matches_no_mask() -> None:
    generator = torch.Generator().manual_seed(1)
    rewards = torch.randn(6 * 8, generator=generator)
    everything = torch.ones(48, dtype=torch.bool)
    for scale_by_std in (True, False):
        torch.testing.assert_close(
            group_relative_advantages(rewards, 8, scale_by_std=scale_by_std, valid=everything),
            group_relative_advantages(rewards, 8, scale_by_std=scale_by_std),
        )


def test_invalid_rewards_may_be_nan_but_valid_ones_may_not() -> None:
    rewards = torch.tensor([1.0, math.nan, -1.0, -1.0])
    advantages = group_relative_advantages(rewards, 2, valid=torch.tensor([True, False, True, True]))
    torch.testing.assert_close(advantages, torch.zeros(4))
    with pytest.raises(ValueError, match="rewards of valid responses contain NaN"):
        group_relative_advantages(rewards, 2, valid=torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize(
    ("valid", "error", "message"),
    [
        (torch.ones(4), TypeError, "valid must be a torch.bool tensor, got torch.float32"),
        ([True] * 4, TypeError, "valid must be a torch.bool tensor, got list"),
        (torch.ones(2, 2, dtype=torch.bool), ValueError, r"valid has shape \[2, 2\]; expected .* \[4\]"),
    ],
)
def test_mask_validation(valid: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        group_relative_advantages(torch.ones(4), 2, valid=valid)  # type: ignore[arg-type]
