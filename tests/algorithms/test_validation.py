"""Bad input to the policy losses gives ValueError/TypeError naming the field, the rule and the fix."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_dispo.algorithms import PolicyLossConfig, compute_policy_loss, get_preset

NUM_GPUS = 0


def good() -> dict[str, object]:
    return {
        "logprobs": -torch.rand(2, 3),
        "old_logprobs": -torch.rand(2, 3),
        "advantages": torch.tensor([1.0, -1.0]),
        "response_mask": torch.ones(2, 3),
        "config": get_preset("dispo"),
    }


def call(**changes: object) -> None:
    arguments = good()
    keywords = {k: changes.pop(k) for k in list(changes) if k not in arguments}
    arguments.update(changes)
    compute_policy_loss(**arguments, **keywords)


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"old_logprobs": -torch.rand(2, 4)}, ValueError, r"old_logprobs has shape \[2, 4\] but logprobs has \[2, 3\]"),
        ({"response_mask": torch.ones(3, 3)}, ValueError, r"response_mask has shape \[3, 3\]"),
        ({"advantages": torch.ones(3)}, ValueError, r"advantages has shape \[3\]; expected \[2\] or \[2, 1\]"),
        ({"logprobs": -torch.rand(6)}, ValueError, r"logprobs has shape \[6\]; expected \[batch, seq\]"),
        ({"logprobs": [[-1.0]]}, TypeError, "logprobs must be a torch.Tensor, got list"),
        (
            {"logprobs": torch.tensor([[-1.0, float("nan"), -1.0], [-1, -1, -1]])},
            ValueError,
            r"logprobs has 1 non-finite value\(s\), first at index \(0, 1\) = nan; .*fill padding with 0",
        ),
        (
            {"old_logprobs": torch.tensor([[-1.0, -1, -1], [-1, -1, -math.inf]])},
            ValueError,
            r"old_logprobs has 1 non-finite value\(s\), first at index \(1, 2\) = -inf",
        ),
        ({"advantages": torch.tensor([math.inf, 1.0])}, ValueError, "advantages has 1 non-finite"),
        ({"response_mask": torch.zeros(2, 3)}, ValueError, "response_mask is all zero.*pass num_global_tokens"),
        ({"response_mask": torch.full((2, 3), 0.5)}, ValueError, "response_mask must hold only 0 and 1"),
        ({"num_global_tokens": 0}, ValueError, "num_global_tokens=0 must be > 0"),
        ({"num_global_tokens": 4}, ValueError, r"num_global_tokens=4 is smaller than this micro-batch's own 6"),
        ({"num_global_tokens": float("nan")}, ValueError, "num_global_tokens=nan must be a finite positive number"),
        ({"config": "dispo"}, TypeError, r"config must be a PolicyLossConfig, got str; use get_preset\(name\)"),
        (
            {"config": get_preset("dispo", condition_on="correctness")},
            ValueError,
            "condition_on='correctness' needs the `correct` tensor",
        ),
        ({"correct": torch.tensor([2, 0])}, ValueError, "correct must hold only 0/1"),
        (
            {"config": get_preset("grpo"), "num_global_tokens": 10},
            ValueError,
            "loss_type='grpo' averages per sequence; with num_global_tokens also pass num_global_sequences",
        ),
        (
            {"config": get_preset("sspo"), "segment_ids": torch.full((2, 3), 3)},
            ValueError,
            r"segment_ids must lie in \[0, 3\)",
        ),
        (
            {"config": get_preset("sspo"), "segment_ids": torch.zeros(2, 3)},
            TypeError,
            "segment_ids has dtype torch.float32; expected an integer dtype",
        ),
        ({"config": get_preset("sspo"), "entropy": -torch.ones(2, 3)}, ValueError, "entropy has negative values"),
        ({"entropy": torch.ones(2, 2)}, ValueError, r"entropy has shape \[2, 2\]; expected \[2, 3\]"),
    ],
)
def test_bad_tensors_are_rejected_with_the_field_and_fix(changes: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        call(**changes)


def test_empty_micro_batch_is_legal_with_a_global_normaliser() -> None:
    logprobs = torch.full((1, 3), -1.0, requires_grad=True)
    loss, metrics = compute_policy_loss(
        logprobs, torch.zeros(1, 3), torch.tensor([1.0]), torch.zeros(1, 3), get_preset("dispo"), num_global_tokens=7
    )
    loss.backward()
    assert loss.item() == 0.0 and metrics["loss"] == 0.0
    assert torch.equal(logprobs.grad, torch.zeros(1, 3))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("eps_low_pos", -0.1, r"eps_low_pos=-0.1 must be a finite number in \[0, 1\]"),
        ("eps_low_neg", 1.5, r"eps_low_neg=1.5 must be a finite number in \[0, 1\].*use 1.0 for no lower clipping"),
        ("eps_high_pos", -1.0, "eps_high_pos=-1.0 must be a finite number >= 0"),
        ("eps_high_neg", math.inf, "eps_high_neg=inf must be a finite number >= 0.*large finite value"),
        ("eps_high", math.nan, "eps_high=nan must be a finite number >= 0"),
        ("eps_low", True, r"eps_low=True must be a finite number in \[0, 1\]"),
        ("loss_type", "ppo", r"loss_type='ppo' is not a registered policy loss; use one of \['cispo'"),
        ("condition_on", "sign", r"condition_on='sign' is not a valid choice; use one of \['advantage_sign'"),
        ("aggregation", "sum", "aggregation='sum' is not a valid choice"),
        ("sspo_segment_len", 0, "sspo_segment_len=0 must be >= 1"),
        ("sspo_scale_min", 3.0, r"sspo_scale_min \(3.0\) must be <= sspo_scale_max \(2.0\)"),
    ],
)
def test_config_validation_names_field_and_fix(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PolicyLossConfig(**{field: value})


def test_config_is_frozen() -> None:
    config = PolicyLossConfig()
    with pytest.raises(AttributeError):
        config.eps_low_pos = 0.3  # type: ignore[misc]


def test_backward_through_a_retained_graph_gives_the_same_gradient_again() -> None:
    """Backward through a retained graph (retain_graph=True, autograd.grad) gives the same gradient every time."""
    logprobs = torch.tensor([[-1.0, -0.2], [-0.5, -2.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -0.1], [-0.5, -1.0]])
    loss, _ = compute_policy_loss(
        logprobs, old, torch.tensor([1.0, -1.0]), torch.ones(2, 2), get_preset("dispo"), num_global_tokens=4
    )
    loss.backward(retain_graph=True)
    first = logprobs.grad.clone()
    # closed form -w * A / N: r = (e^0.5, e^-0.1) with A = 1 lie in (0.8, 11), r = (1, e^-1) with A = -1 in (0, 101)
    weights = torch.exp(torch.tensor([[0.5, -0.1], [0.0, -1.0]]))
    torch.testing.assert_close(first, -weights * torch.tensor([[1.0], [-1.0]]) / 4)
    (again,) = torch.autograd.grad(loss, logprobs, retain_graph=True)
    torch.testing.assert_close(again, first)
    logprobs.grad = None
    (2.0 * loss).backward()
    torch.testing.assert_close(logprobs.grad, 2.0 * first)


def test_bfloat16_logprobs_are_computed_in_float32_and_get_a_bfloat16_gradient() -> None:
    # r = [e^0.5, e^-0.5] with A = 1: w = [e^0.5, 0.8 (clipped)]; grad = -w / 2, rounded to bf16
    logprobs = torch.tensor([[-0.5, -1.5]], dtype=torch.bfloat16, requires_grad=True)
    loss, _ = compute_policy_loss(
        logprobs, torch.tensor([[-1.0, -1.0]]), torch.tensor([1.0]), torch.ones(1, 2), get_preset("dispo")
    )
    loss.backward()
    assert logprobs.grad.dtype == torch.bfloat16
    expected = torch.tensor([[-math.exp(0.5) / 2, -0.8 / 2]])
    torch.testing.assert_close(logprobs.grad.float(), expected, rtol=1e-2, atol=0)
