"""compute_policy_loss in float32 against an independent float64 reference, calls that leave no state behind, a
scaled backward, and the input checks on values that are easy to get wrong (non-finite padding, a non-finite mask,
finite values whose sum overflows)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_dispo.algorithms import compute_policy_loss, get_preset


def dispo_reference(
    logprobs: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Closed-form DISPO gradient in float64: -clip(r, pair by sign(A)) * A * mask / N, clipped in ratio space."""
    lp, old64, adv, m = (t.detach().double() for t in (logprobs, old, advantages, mask))
    ratio = torch.exp(lp - old64)
    positive = (adv > 0).unsqueeze(1)
    weight = torch.where(positive, ratio.clamp(0.8, 11.0), ratio.clamp(0.0, 101.0))
    return -weight * adv.unsqueeze(1) * m / m.sum()


def batch(rows: int, seq: int, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(rows, seq, generator=generator, dtype=dtype) * 3
    return {
        "logprobs": logprobs.requires_grad_(),
        "old": logprobs.detach() + 1.5 * torch.randn(rows, seq, generator=generator, dtype=dtype),
        "advantages": torch.randn(rows, generator=generator, dtype=dtype),
        "mask": (torch.rand(rows, seq, generator=generator) < 0.7).to(dtype),
    }


def run(data: dict[str, torch.Tensor], scale: float = 1.0) -> tuple[float, torch.Tensor, dict[str, float]]:
    data["logprobs"].grad = None
    loss, metrics = compute_policy_loss(
        data["logprobs"], data["old"], data["advantages"], data["mask"], get_preset("dispo")
    )
    (loss * scale if scale != 1.0 else loss).backward()
    return loss.item(), data["logprobs"].grad.clone(), metrics


def test_float32_gradient_matches_float64_closed_form_within_a_few_ulp() -> None:
    data = batch(16, 257, seed=3)
    _, grad, _ = run(data)
    expected = dispo_reference(data["logprobs"], data["old"], data["advantages"], data["mask"])
    torch.testing.assert_close(grad.double(), expected, rtol=5e-7, atol=1e-12)


def test_a_call_of_another_shape_in_between_leaves_results_unchanged() -> None:
    small, large = batch(4, 33, seed=4), batch(32, 500, seed=5)
    first = run(small)
    run(large)  # no state survives a call
    again = run(small)
    assert first[0] == again[0]
    assert torch.equal(first[1], again[1])
    assert first[2] == again[2]
    expected = dispo_reference(small["logprobs"], small["old"], small["advantages"], small["mask"])
    torch.testing.assert_close(again[1].double(), expected, rtol=5e-7, atol=1e-12)


def test_a_kept_gradient_is_not_changed_by_a_later_call() -> None:
    data = batch(8, 64, seed=6)
    _, _, _ = run(data)
    kept = data["logprobs"].grad  # the caller keeps the gradient tensor itself
    snapshot = kept.clone()
    run(batch(8, 64, seed=7))  # a second call of the same shape
    assert torch.equal(kept, snapshot)


def test_backward_with_a_non_unit_seed_scales_the_gradient() -> None:
    data = batch(4, 20, seed=8, dtype=torch.float64)
    _, grad, _ = run(data, scale=-2.5)
    expected = dispo_reference(data["logprobs"], data["old"], data["advantages"], data["mask"])
    torch.testing.assert_close(grad, -2.5 * expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("field", ["logprobs", "old"])
def test_non_finite_value_on_padding_is_still_reported_by_name(field: str) -> None:
    data = batch(3, 5, seed=9)
    data["mask"][1, 4] = 0.0
    with torch.no_grad():
        data[field][1, 4] = math.nan
    name = "logprobs" if field == "logprobs" else "old_logprobs"
    with pytest.raises(ValueError, match=rf"{name} has 1 non-finite value\(s\), first at index \(1, 4\) = nan"):
        run(data)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_mask_is_rejected_as_a_mask_error(bad: float) -> None:
    data = batch(2, 3, seed=10)
    data["mask"][0, 1] = bad
    with pytest.raises(ValueError, match="response_mask must hold only 0 and 1"):
        run(data)


def test_finite_inputs_whose_probe_sum_overflows_are_not_rejected() -> None:
    # each log r = 1e38 is finite but their float32 sum overflows: a finiteness check by sum would reject them
    logprobs = torch.full((1, 6), 1e38, requires_grad=True)
    loss, metrics = compute_policy_loss(
        logprobs, torch.zeros(1, 6), torch.tensor([1.0]), torch.ones(1, 6), get_preset("dispo")
    )
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.full((1, 6), -11.0 / 6))  # every weight clipped to 1 + 10
    assert metrics["regime1/token_frac"] == 1.0 and metrics["regime1/clip_frac"] == 1.0
