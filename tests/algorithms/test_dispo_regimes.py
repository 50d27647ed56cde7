"""DISPO's four regimes at, inside and outside their bounds; eps = 0 disables a regime; the gradient is
-sg(w) * A * mask / N; CISPO is DISPO with equal pairs; correctness conditioning."""

from __future__ import annotations

import pytest
import torch

from megatron_dispo.algorithms import PolicyLossConfig, compute_policy_loss, get_preset

NUM_GPUS = 0

# bounds of the paper default: positive [1 - 0.2, 1 + 10] = [0.8, 11]; negative [1 - 1, 1 + 100] = [0, 101]
# one row per regime, each with a token inside, exactly at and outside the bound of that regime
REGIME_CASES = {
    1: (+1.0, [5.0, 11.0, 40.0], [5.0, 11.0, 11.0]),  # A > 0, r > 1: capped at 11
    2: (+1.0, [0.9, 0.8, 0.3], [0.9, 0.8, 0.8]),  # A > 0, r < 1: floored at 0.8
    3: (-1.0, [50.0, 101.0, 500.0], [50.0, 101.0, 101.0]),  # A < 0, r > 1: capped at 101
    4: (-1.0, [0.5, 1e-3, 1e-9], [0.5, 1e-3, 1e-9]),  # A < 0, r < 1: floor 0 never binds
}


def weights_from_gradient(ratios: list[float], advantage: float, config: PolicyLossConfig) -> torch.Tensor:
    """The IS weight DISPO applied per token, read back from the gradient (grad = -w * A / N, N = 3)."""
    ratio = torch.tensor([ratios], dtype=torch.float64)
    logprobs = torch.full((1, 3), -0.7, dtype=torch.float64, requires_grad=True)
    loss, _ = compute_policy_loss(
        logprobs,
        logprobs.detach() - ratio.log(),
        torch.tensor([advantage], dtype=torch.float64),
        torch.ones(1, 3),
        config,
    )
    loss.backward()
    return -logprobs.grad[0] * 3 / advantage


@pytest.mark.parametrize("regime", [1, 2, 3, 4])
def test_each_regime_inside_at_and_outside_its_bound(regime: int) -> None:
    advantage, ratios, expected = REGIME_CASES[regime]
    weights = weights_from_gradient(ratios, advantage, get_preset("dispo"))
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-20)


@pytest.mark.parametrize(
    ("regime", "field"),
    [(1, "eps_high_pos"), (2, "eps_low_pos"), (3, "eps_high_neg"), (4, "eps_low_neg")],
)
def test_eps_zero_disables_the_regime_weight_is_one(regime: int, field: str) -> None:
    advantage, ratios, _ = REGIME_CASES[regime]
    weights = weights_from_gradient(ratios, advantage, get_preset("dispo", **{field: 0.0}))
    torch.testing.assert_close(weights, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-15)
    # the other three regimes keep their bounds
    for other, (other_advantage, other_ratios, other_expected) in REGIME_CASES.items():
        if other != regime:
            torch.testing.assert_close(
                weights_from_gradient(other_ratios, other_advantage, get_preset("dispo", **{field: 0.0})),
                torch.tensor(other_expected, dtype=torch.float64),
                rtol=1e-12,
                atol=1e-20,
            )


def test_dispo_no_regime_presets_flatten_their_regime() -> None:
    torch.testing.assert_close(
        weights_from_gradient([50.0, 101.0, 500.0], -1.0, get_preset("dispo_no_regime3")),
        torch.ones(3, dtype=torch.float64),
    )
    torch.testing.assert_close(
        weights_from_gradient([0.5, 1e-3, 1e-9], -1.0, get_preset("dispo_no_regime4")),
        torch.ones(3, dtype=torch.float64),
    )


def test_gradient_is_minus_detached_weight_times_advantage_times_mask_over_n() -> None:
    torch.manual_seed(1)
    logprobs = (-torch.rand(5, 9, dtype=torch.float64) * 2).requires_grad_()
    old = logprobs.detach() + 1.5 * torch.randn(5, 9, dtype=torch.float64)  # wide ratios: every regime clips
    advantages = torch.tensor([1.3, -0.7, 0.0, -2.0, 0.4], dtype=torch.float64)
    mask = torch.rand(5, 9) < 0.7
    loss, _ = compute_policy_loss(logprobs, old, advantages, mask, get_preset("dispo"))
    loss.backward()
    # independent reference: IS weight clipped in ratio space, per-row pair by sign(A), detached
    ratio = torch.exp(logprobs.detach() - old)
    positive = (advantages > 0).unsqueeze(1)
    weight = torch.where(positive, ratio.clamp(0.8, 11.0), ratio.clamp(0.0, 101.0))
    expected = -weight * advantages.unsqueeze(1) * mask / mask.sum()
    torch.testing.assert_close(logprobs.grad, expected, rtol=1e-12, atol=1e-15)
    # the value is the same sum with logprobs (IS weight treated as a constant)
    assert loss.item() == pytest.approx((expected * logprobs.detach()).sum().item(), rel=1e-12)


def test_per_token_advantages_broadcast_like_per_sequence() -> None:
    torch.manual_seed(2)
    logprobs = (-torch.rand(3, 4, dtype=torch.float64)).requires_grad_()
    old = logprobs.detach() + torch.randn(3, 4, dtype=torch.float64)
    advantages = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    mask = torch.ones(3, 4)
    for config in (get_preset("dispo"), get_preset("dapo"), get_preset("grpo"), get_preset("online_sft")):
        per_sequence, metrics_seq = compute_policy_loss(logprobs, old, advantages, mask, config)
        (grad_seq,) = torch.autograd.grad(per_sequence, logprobs)
        per_token, metrics_tok = compute_policy_loss(logprobs, old, advantages[:, None].expand(3, 4), mask, config)
        (grad_tok,) = torch.autograd.grad(per_token, logprobs)
        assert per_token.item() == pytest.approx(per_sequence.item(), rel=1e-12)
        torch.testing.assert_close(grad_tok, grad_seq)
        for key, value in metrics_seq.items():
            assert metrics_tok[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (config.loss_type, key)


def test_cispo_equals_dispo_with_equal_pairs() -> None:
    torch.manual_seed(3)
    logprobs = (-torch.rand(6, 10, dtype=torch.float64)).requires_grad_()
    old = logprobs.detach() + torch.randn(6, 10, dtype=torch.float64)
    advantages = torch.randn(6, dtype=torch.float64)
    mask = torch.rand(6, 10) < 0.8
    for eps_low, eps_high in ((1.0, 100.0), (0.2, 0.28), (0.0, 0.0)):
        cispo = PolicyLossConfig(loss_type="cispo", eps_low=eps_low, eps_high=eps_high)
        dispo = PolicyLossConfig(
            loss_type="dispo", eps_low_pos=eps_low, eps_high_pos=eps_high, eps_low_neg=eps_low, eps_high_neg=eps_high
        )
        loss_c, metrics_c = compute_policy_loss(logprobs, old, advantages, mask, cispo)
        (grad_c,) = torch.autograd.grad(loss_c, logprobs)
        loss_d, metrics_d = compute_policy_loss(logprobs, old, advantages, mask, dispo)
        (grad_d,) = torch.autograd.grad(loss_d, logprobs)
        assert loss_c.item() == pytest.approx(loss_d.item(), rel=1e-12)
        torch.testing.assert_close(grad_c, grad_d, rtol=1e-12, atol=0)
        assert metrics_c == pytest.approx(metrics_d, rel=1e-12)


def test_condition_on_correctness_picks_pairs_by_correct_and_logs_disagreement() -> None:
    # batch A of the closed-form tests with correct = [False, True] (opposite of sign(A)):
    # row 0 (A=2) now gets the negative pair [0, 101]: w = [20, 1.5, 0.5]
    # row 1 (A=-1) gets the positive pair [0.8, 11]: w = [11, 3, 0.8]
    ratios = torch.tensor([[20.0, 1.5, 0.5], [200.0, 3.0, 0.01]], dtype=torch.float64)
    logprobs = torch.full((2, 3), -1.0, dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([2.0, -1.0], dtype=torch.float64)
    config = get_preset("dispo", condition_on="correctness")
    loss, metrics = compute_policy_loss(
        logprobs, logprobs.detach() - ratios.log(), advantages, torch.ones(2, 3), config, correct=torch.tensor([0, 1])
    )
    assert loss.item() == pytest.approx((2 * 22 - 14.8) / 6, rel=1e-12)
    assert metrics["sign_correct_disagree_frac"] == pytest.approx(1.0)
    # regimes follow the pair: the correct row 1 has r = 200 (clipped at 11) and 3 in regime 1, 0.01 in regime 2
    assert metrics["regime1/token_frac"] == pytest.approx(2 / 6)
    assert metrics["regime1/clip_frac"] == pytest.approx(0.5)
    assert metrics["regime1/is_weight_mean"] == pytest.approx((11 + 3) / 2)
    assert metrics["regime2/is_weight_mean"] == pytest.approx(0.8)
    assert metrics["regime3/is_weight_mean"] == pytest.approx((20 + 1.5) / 2)
    # with advantage-sign conditioning the same `correct` only feeds the disagreement metric
    _, metrics_sign = compute_policy_loss(
        logprobs,
        logprobs.detach() - ratios.log(),
        advantages,
        torch.ones(2, 3),
        get_preset("dispo"),
        correct=torch.tensor([True, True]),
    )
    assert metrics_sign["sign_correct_disagree_frac"] == pytest.approx(3 / 6)  # row 1: A < 0 but correct


def test_on_policy_tokens_and_zero_advantages_sit_in_no_regime() -> None:
    logprobs = torch.tensor([[-1.0, -2.0], [-1.0, -0.5]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0, -1.0], [-2.0, -1.0]], dtype=torch.float64)  # r = [1, e^-1], [e, e^0.5]
    advantages = torch.tensor([1.0, 0.0], dtype=torch.float64)
    _, metrics = compute_policy_loss(logprobs, old, advantages, torch.ones(2, 2), get_preset("dispo"))
    assert metrics["regime2/token_frac"] == pytest.approx(1 / 4)  # only (0, 1)
    total = sum(metrics[f"regime{k}/token_frac"] for k in (1, 2, 3, 4))
    assert total == pytest.approx(1 / 4)
