"""Group-relative advantages (Eq. 3), DAPO dynamic sampling and overlong shaping, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_dispo.algorithms import (
    OverlongConfig,
    apply_overlong_penalty,
    filter_mixed_groups,
    group_relative_advantages,
    overlong_penalty,
)

NUM_GPUS = 0


def test_group_relative_advantages_population_std() -> None:
    # group 0: rewards [1, -1, -1, -1]: mean -0.5, population std sqrt(3/4) -> [1.5, -0.5, -0.5, -0.5] / sqrt(0.75)
    # group 1: all +1 -> std 0 -> advantages exactly 0 (never NaN)
    rewards = torch.tensor([1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0])
    advantages = group_relative_advantages(rewards, group_size=4)
    root = math.sqrt(0.75)
    expected = torch.tensor([1.5 / root, -0.5 / root, -0.5 / root, -0.5 / root, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(advantages, expected)
    assert torch.isfinite(advantages).all()


def test_group_relative_advantages_without_std_scaling_dr_grpo() -> None:
    rewards = torch.tensor([3.0, 1.0, 2.0, 2.0])
    torch.testing.assert_close(
        group_relative_advantages(rewards, group_size=2, scale_by_std=False), torch.tensor([1.0, -1.0, 0.0, 0.0])
    )


def test_group_of_one_and_shaped_constant_groups_are_zero() -> None:
    torch.testing.assert_close(group_relative_advantages(torch.tensor([0.7, -2.0]), 1), torch.zeros(2))
    constant = torch.full((3,), 0.1) * 3  # float residue must not produce a huge advantage
    torch.testing.assert_close(group_relative_advantages(constant, 3), torch.zeros(3))


@pytest.mark.parametrize(
    ("rewards", "group_size", "message"),
    [
        (torch.ones(5), 2, "rewards has 5 entries, not a multiple of group_size=2"),
        (torch.ones(4), 0, "group_size=0 must be an int >= 1"),
        (torch.ones(2, 2), 2, r"rewards has shape \[2, 2\]; expected \[num_groups \* group_size\]"),
        (torch.tensor([1.0, math.nan]), 2, "rewards contain NaN or inf"),
    ],
)
def test_advantage_validation(rewards: torch.Tensor, group_size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        group_relative_advantages(rewards, group_size)


def test_dynamic_sampling_keeps_mixed_groups_by_raw_correctness() -> None:
    # groups of 3: [all correct], [mixed], [all wrong], [mixed]
    correct = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0, 0, 1, 0, 0])
    result = filter_mixed_groups(correct, group_size=3)
    assert result.kept_groups.tolist() == [1, 3]
    assert result.kept_indices.tolist() == [3, 4, 5, 9, 10, 11]
    assert (result.num_kept_groups, result.num_dropped_groups) == (2, 2)
    assert (result.num_dropped_all_correct, result.num_dropped_all_wrong) == (1, 1)


def test_dynamic_sampling_validation() -> None:
    with pytest.raises(ValueError, match="correct must hold only 0/1"):
        filter_mixed_groups(torch.tensor([0.5, 1.0]), 2)  # a shaped reward is not a correctness flag
    with pytest.raises(ValueError, match="not a multiple of group_size=4"):
        filter_mixed_groups(torch.tensor([True, False]), 4)


def test_overlong_penalty_closed_form_dapo_defaults() -> None:
    # ramp from L_max - L_cache = 16384 (0) to L_max = 20480 (-1); -1 beyond
    lengths = torch.tensor([0, 16384, 16385, 18432, 20480, 20481, 50000])
    expected = torch.tensor([0.0, 0.0, -1 / 4096, -0.5, -1.0, -1.0, -1.0])
    torch.testing.assert_close(overlong_penalty(lengths, OverlongConfig()), expected)


def test_overlong_penalty_factor_and_application_to_rewards() -> None:
    config = OverlongConfig(max_length=10, cache_length=4, factor=0.5)
    lengths = torch.tensor([6, 8, 12])  # penalty [0, -0.5, -1] * 0.5
    shaped = apply_overlong_penalty(torch.tensor([1.0, 1.0, -1.0]), lengths, config)
    torch.testing.assert_close(shaped, torch.tensor([1.0, 0.75, -1.5]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_length": 0}, "max_length=0 must be an int >= 1"),
        ({"max_length": 100, "cache_length": 200}, r"cache_length \(200\) must be in \[1, max_length \(100\)\]"),
        ({"factor": -1.0}, "factor=-1.0 must be a number >= 0"),
    ],
)
def test_overlong_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OverlongConfig(**kwargs)
