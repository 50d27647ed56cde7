"""CPU tests for truncated_is_weights (TIS, Yao et al. 2025): min(pi_old / pi_rollout, cap) on response tokens."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_dispo.algorithms import truncated_is_weights

NUM_GPUS = 0


def test_weights_match_the_closed_form_and_are_one_off_the_response() -> None:
    # row 0: old - rollout = [ln 1.5, ln 0.25, ln 4 (capped at 2), padding]
    # row 1: [prompt, 0 (ratio 1), ln 3 (capped at 2), padding]
    old = torch.tensor([[math.log(1.5), -2.0, 0.0, 5.0], [9.0, -1.0, math.log(3.0), 0.0]], dtype=torch.float64)
    rollout = torch.tensor(
        [[0.0, -2.0 - math.log(0.25), -math.log(4.0), -50.0], [0.0, -1.0, 0.0, 80.0]], dtype=torch.float64
    )
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    weights = truncated_is_weights(old, rollout, mask, cap=2.0)
    expected = torch.tensor([[1.5, 0.25, 2.0, 1.0], [1.0, 1.0, 2.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(weights, expected, rtol=1e-12, atol=0)


def test_float_mask_inf_padding_and_bf16_inputs() -> None:
    # padding may hold anything (here nan in rollout): it gets weight 1, never nan
    old = torch.tensor([[0.0, 0.5, 0.0]], dtype=torch.bfloat16)
    rollout = torch.tensor([[0.0, 0.0, math.nan]], dtype=torch.bfloat16)
    weights = truncated_is_weights(old, rollout, torch.tensor([[1.0, 1.0, 0.0]]), cap=10.0)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, torch.tensor([[1.0, math.exp(0.5), 1.0]]))


def test_weights_carry_no_gradient() -> None:
    old = torch.zeros(1, 2, requires_grad=True)
    weights = truncated_is_weights(old, torch.full((1, 2), -0.1), torch.ones(1, 2), cap=2.0)
    assert not weights.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"cap": 0.0}, ValueError, "cap=0.0 must be a finite number > 0"),
        ({"cap": math.inf}, ValueError, "cap=inf must be a finite number > 0"),
        ({"rollout_logprobs": torch.zeros(2, 4)}, ValueError, r"rollout_logprobs \[2, 4\]"),
        ({"old_logprobs": torch.zeros(2, 3, dtype=torch.long)}, TypeError, "old_logprobs must be a floating"),
        ({"response_mask": [[1, 1, 1]]}, TypeError, "response_mask must be a torch.Tensor"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict, error: type, message: str) -> None:
    arguments = {
        "old_logprobs": torch.zeros(2, 3),
        "rollout_logprobs": torch.zeros(2, 3),
        "response_mask": torch.ones(2, 3),
        "cap": 2.0,
    }
    with pytest.raises(error, match=message):
        truncated_is_weights(**{**arguments, **kwargs})
