"""Every policy loss against values worked out by hand on small batches (float64, so tolerances are tight).

Batch A (token-mean losses): 2 responses x 3 tokens, all response tokens, logprobs = -1 everywhere, so each token
contributes -w * A * (-1) = w * A and the value is sum(w * A) / 6.
    row 0: A = +2, r = [20, 1.5, 0.5]
    row 1: A = -1, r = [200, 3, 0.01]
Batch B (sequence-mean losses): row 0 has 2 response tokens (third is padding), row 1 has 3.
    row 0: A = +1, r = [2, 0.5, (pad)]
    row 1: A = -1, r = [1.1, 0.9, 0.25]
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_dispo.algorithms import PolicyLossConfig, compute_policy_loss, get_preset

NUM_GPUS = 0


def batch_a() -> dict[str, torch.Tensor]:
    ratios = torch.tensor([[20.0, 1.5, 0.5], [200.0, 3.0, 0.01]], dtype=torch.float64)
    logprobs = torch.full((2, 3), -1.0, dtype=torch.float64, requires_grad=True)
    return {
        "logprobs": logprobs,
        "old_logprobs": (logprobs.detach() - ratios.log()),
        "advantages": torch.tensor([2.0, -1.0], dtype=torch.float64),
        "response_mask": torch.ones(2, 3, dtype=torch.float64),
    }


def batch_b() -> dict[str, torch.Tensor]:
    ratios = torch.tensor([[2.0, 0.5, 5.0], [1.1, 0.9, 0.25]], dtype=torch.float64)
    logprobs = torch.full((2, 3), -1.0, dtype=torch.float64, requires_grad=True)
    return {
        "logprobs": logprobs,
        "old_logprobs": (logprobs.detach() - ratios.log()),
        "advantages": torch.tensor([1.0, -1.0], dtype=torch.float64),
        "response_mask": torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool),
    }


def run(batch: dict[str, torch.Tensor], config: PolicyLossConfig, **kwargs: object) -> tuple[float, torch.Tensor, dict]:
    loss, metrics = compute_policy_loss(
        batch["logprobs"], batch["old_logprobs"], batch["advantages"], batch["response_mask"], config, **kwargs
    )
    loss.backward()
    grad = batch["logprobs"].grad.clone()
    batch["logprobs"].grad = None
    return loss.item(), grad, metrics


def expect(grad: torch.Tensor, rows: list[list[float]]) -> None:
    torch.testing.assert_close(grad, torch.tensor(rows, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_dispo_closed_form_value_gradient_and_regime_telemetry() -> None:
    # positive pair [0.8, 11]: w0 = [11 (clipped, regime 1), 1.5 (regime 1), 0.8 (clipped, regime 2)]
    # negative pair [0, 101]:  w1 = [101 (clipped, regime 3), 3 (regime 3), 0.01 (regime 4, never clipped)]
    # value = (2 * (11 + 1.5 + 0.8) - (101 + 3 + 0.01)) / 6 = (26.6 - 104.01) / 6
    value, grad, metrics = run(batch_a(), get_preset("dispo"))
    assert value == pytest.approx((26.6 - 104.01) / 6, rel=1e-12)
    # grad = -sg(w) * A / N
    expect(grad, [[-22 / 6, -3 / 6, -1.6 / 6], [101 / 6, 3 / 6, 0.01 / 6]])
    assert metrics["loss"] == pytest.approx(value, rel=1e-12)
    expected = {
        "regime1/token_frac": 2 / 6,
        "regime1/clip_frac": 1 / 2,
        "regime1/is_weight_mean": (11 + 1.5) / 2,
        "regime2/token_frac": 1 / 6,
        "regime2/clip_frac": 1.0,
        "regime2/is_weight_mean": 0.8,
        "regime3/token_frac": 2 / 6,
        "regime3/clip_frac": 1 / 2,
        "regime3/is_weight_mean": (101 + 3) / 2,
        "regime4/token_frac": 1 / 6,
        "regime4/clip_frac": 0.0,
        "regime4/is_weight_mean": 0.01,
        "clip_frac": 3 / 6,
        "log_ratio_abs_mean": (math.log(20) + math.log(1.5) + math.log(2) + math.log(200) + math.log(3) + math.log(100))
        / 6,
        "sign_correct_disagree_frac": 0.0,
    }
    for key, want in expected.items():
        assert metrics[key] == pytest.approx(want, rel=1e-9, abs=1e-12), key


def test_cispo_closed_form() -> None:
    # one pair [0, 101]: w = [20, 1.5, 0.5 | 101, 3, 0.01]; value = (2 * 22 - 104.01) / 6
    value, grad, metrics = run(batch_a(), get_preset("cispo"))
    assert value == pytest.approx((44 - 104.01) / 6, rel=1e-12)
    expect(grad, [[-40 / 6, -3 / 6, -1 / 6], [101 / 6, 3 / 6, 0.01 / 6]])
    assert metrics["clip_frac"] == pytest.approx(1 / 6)  # only r = 200


def test_dapo_closed_form() -> None:
    # bounds [0.8, 1.28], l = -min(r A, clip(r) A):
    # row 0 (A=2): r=20 -> -2.56 (clipped), r=1.5 -> -2.56 (clipped), r=0.5 -> -1.0 (grad -A r = -1)
    # row 1 (A=-1): r=200 -> 200 (grad 200), r=3 -> 3 (grad 3), r=0.01 -> 0.8 (clipped)
    value, grad, metrics = run(batch_a(), get_preset("dapo"))
    assert value == pytest.approx((-2.56 - 2.56 - 1.0 + 200 + 3 + 0.8) / 6, rel=1e-12)
    expect(grad, [[0, 0, -1 / 6], [200 / 6, 3 / 6, 0]])
    assert metrics["clip_frac"] == pytest.approx(3 / 6)
    assert metrics["regime1/clip_frac"] == pytest.approx(1.0)
    assert metrics["regime4/clip_frac"] == pytest.approx(1.0)


def test_grpo_closed_form_sequence_mean() -> None:
    # bounds [0.8, 1.2]; row 0 (2 tokens, A=1): r=2 -> -1.2 (clipped), r=0.5 -> -0.5 (grad -0.5)
    # row 1 (3 tokens, A=-1): r=1.1 -> 1.1, r=0.9 -> 0.9, r=0.25 -> 0.8 (clipped)
    # value = ((-1.2 - 0.5) / 2 + (1.1 + 0.9 + 0.8) / 3) / 2; grad_t = -A r / (|o_i| * 2)
    value, grad, _ = run(batch_b(), get_preset("grpo"))
    assert value == pytest.approx(((-1.2 - 0.5) / 2 + (1.1 + 0.9 + 0.8) / 3) / 2, rel=1e-12)
    expect(grad, [[0, -0.5 / 4, 0], [1.1 / 6, 0.9 / 6, 0]])


def test_reinforce_closed_form_unclipped_detached_ratio() -> None:
    # l_t = -sg(r) A lp = r A: row 0 mean (2 + 0.5) / 2 = 1.25, row 1 mean -(1.1 + 0.9 + 0.25) / 3 = -0.75
    value, grad, metrics = run(batch_b(), get_preset("reinforce"))
    assert value == pytest.approx((1.25 - 0.75) / 2, rel=1e-12)
    expect(grad, [[-2 / 4, -0.5 / 4, 0], [1.1 / 6, 0.9 / 6, 0.25 / 6]])
    assert metrics["clip_frac"] == 0.0


def test_online_sft_variants_closed_form() -> None:
    # only row 0 (A > 0) contributes; N = 6 counts every response token
    value, grad, metrics = run(batch_a(), get_preset("online_sft"))  # w = 1: value = 3 / 6
    assert value == pytest.approx(3 / 6, rel=1e-12)
    expect(grad, [[-1 / 6, -1 / 6, -1 / 6], [0, 0, 0]])
    assert metrics["regime3/token_frac"] == pytest.approx(2 / 6)  # telemetry still sees the dropped tokens...
    assert metrics["regime3/is_weight_mean"] == 0.0  # ...with weight 0
    value, grad, _ = run(batch_a(), get_preset("regime1_eps0.28"))  # w0 = [1.28, 1.28, 1]
    assert value == pytest.approx(3.56 / 6, rel=1e-12)
    value, _, _ = run(batch_a(), get_preset("regime2_eps0.2"))  # w0 = [1, 1, 0.8]
    assert value == pytest.approx(2.8 / 6, rel=1e-12)
    value, _, _ = run(batch_a(), get_preset("regime12"))  # w0 = [11, 1.5, 0.8]
    assert value == pytest.approx(13.3 / 6, rel=1e-12)
    value, grad, _ = run(batch_a(), get_preset("regime12", online_sft_coefficient="advantage"))  # times A = 2
    assert value == pytest.approx(26.6 / 6, rel=1e-12)
    expect(grad, [[-22 / 6, -3 / 6, -1.6 / 6], [0, 0, 0]])


def test_gspo_closed_form_sequence_ratio() -> None:
    # s_0 = exp((log 2 + log 0.5) / 2) = 1 -> l = -1 per token, grad -A s / (2 * 2) = -0.25
    # s_1 = (1.1 * 0.9 * 0.25) ** (1 / 3) = 0.628 < 0.8 with A < 0 -> clipped: l = 0.8, grad 0
    config = PolicyLossConfig(loss_type="gspo", eps_low=0.2, eps_high=0.28)
    value, grad, metrics = run(batch_b(), config)
    assert value == pytest.approx((-1 + 0.8) / 2, rel=1e-12)
    expect(grad, [[-0.25, -0.25, 0], [0, 0, 0]])
    assert metrics["regime4/token_frac"] == pytest.approx(3 / 5)  # the sequence ratio puts all of row 1 in r < 1
    assert metrics["regime4/clip_frac"] == 1.0


def test_gspo_matches_sequence_level_autograd_reference() -> None:
    # GSPO written at sequence level with autograd (differentiable s_i) must equal the token form exactly
    torch.manual_seed(0)
    logprobs = (-torch.rand(4, 7, dtype=torch.float64)).requires_grad_()
    old = logprobs.detach() + 0.05 * torch.randn(4, 7, dtype=torch.float64)
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=torch.float64)
    mask = torch.ones(4, 7, dtype=torch.float64)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    config = PolicyLossConfig(loss_type="gspo", eps_low=0.01, eps_high=0.02)
    loss, _ = compute_policy_loss(logprobs, old, advantages, mask, config)
    (grad,) = torch.autograd.grad(loss, logprobs)
    s = torch.exp(((logprobs - old) * mask).sum(1) / mask.sum(1))
    reference = -torch.minimum(s * advantages, s.clamp(0.99, 1.02) * advantages).mean()
    (grad_reference,) = torch.autograd.grad(reference, logprobs)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-12)
    torch.testing.assert_close(grad, grad_reference, rtol=1e-10, atol=1e-14)


def test_sspo_closed_form_subsentences_and_entropy_bounds() -> None:
    batch = batch_b()
    segment_ids = torch.tensor([[0, 0, 0], [0, 0, 1]])
    config = PolicyLossConfig(loss_type="sspo", eps_low=0.2, eps_high=0.28)
    # row 0: one subsentence, s = 1 -> l = -1 per token, grad -0.25
    # row 1: s_a = sqrt(1.1 * 0.9) = sqrt(0.99) inside [0.8, 1.28] -> l = s_a per token, grad s_a / 6
    #        s_b = 0.25 < 0.8, A < 0 -> clipped: l = 0.8, grad 0
    s_a = math.sqrt(0.99)
    value, grad, _ = run(batch, config, segment_ids=segment_ids)
    assert value == pytest.approx((-1 + (2 * s_a + 0.8) / 3) / 2, rel=1e-12)
    expect(grad, [[-0.25, -0.25, 0], [s_a / 6, s_a / 6, 0]])
    # entropy: row 1 subsentence a has mean 0.1 -> scale 0.5 (bounds [0.9, 1.14], s_a still inside);
    # subsentence b has 4.0 -> scale 2 (capped) -> lower bound 1 - 0.4 = 0.6 -> l = 0.6
    entropy = torch.tensor([[1.0, 1.0, 0.0], [0.1, 0.1, 4.0]], dtype=torch.float64)
    value, _, _ = run(batch, config, segment_ids=segment_ids, entropy=entropy)
    assert value == pytest.approx((-1 + (2 * s_a + 0.6) / 3) / 2, rel=1e-12)
    # without segment ids: fixed windows of sspo_segment_len tokens; length 3 covers each row -> equals gspo
    gspo_value, gspo_grad, _ = run(batch, PolicyLossConfig(loss_type="gspo", eps_low=0.2, eps_high=0.28))
    window_value, window_grad, _ = run(batch, PolicyLossConfig(loss_type="sspo", eps_low=0.2, eps_high=0.28))
    assert window_value == pytest.approx(gspo_value, rel=1e-12)
    torch.testing.assert_close(window_grad, gspo_grad)


def test_aggregation_override_changes_only_the_normaliser() -> None:
    # reinforce with token_mean over 5 tokens: (2 + 0.5 - 1.1 - 0.9 - 0.25) / 5
    value, _, _ = run(batch_b(), get_preset("reinforce", aggregation="token_mean"))
    assert value == pytest.approx((2 + 0.5 - 1.1 - 0.9 - 0.25) / 5, rel=1e-12)


def test_no_grad_logprobs_return_a_plain_value() -> None:
    batch = batch_a()
    loss, _ = compute_policy_loss(
        batch["logprobs"].detach(),
        batch["old_logprobs"],
        batch["advantages"],
        batch["response_mask"],
        get_preset("dispo"),
    )
    assert not loss.requires_grad and loss.item() == pytest.approx((26.6 - 104.01) / 6, rel=1e-12)


def test_dispo_regime_telemetry_per_token_version_lag() -> None:
    """Batch A with tokens of two versions: row 0's first token and row 1's last were sampled one version before
    pi_old (lag 1), the rest under pi_old's version (lag 0). Each lag's statistics count its own tokens only; the
    loss and the unlagged telemetry do not change."""
    token_lag = torch.tensor([[1, 0, 0], [0, 0, 1]])
    value, grad, plain = run(batch_a(), get_preset("dispo"))
    lagged_value, lagged_grad, metrics = run(batch_a(), get_preset("dispo"), token_lag=token_lag, num_lags=3)
    assert lagged_value == value and torch.equal(lagged_grad, grad)
    assert {key: metrics[key] for key in plain} == plain
    # lag 1: r = 20 (regime 1, clipped to 11) and r = 0.01 (regime 4, not clipped)
    # lag 0: r = 1.5 (regime 1), 0.5 (regime 2, clipped to 0.8), 200 (regime 3, clipped to 101), 3 (regime 3)
    expected = {
        "lag1/token_frac": 2 / 6,
        "lag1/regime1/token_frac": 1 / 6,
        "lag1/regime1/clip_frac": 1.0,
        "lag1/regime1/is_weight_mean": 11.0,
        "lag1/regime2/token_frac": 0.0,
        "lag1/regime3/token_frac": 0.0,
        "lag1/regime4/token_frac": 1 / 6,
        "lag1/regime4/clip_frac": 0.0,
        "lag1/regime4/is_weight_mean": 0.01,
        "lag0/token_frac": 4 / 6,
        "lag0/regime1/token_frac": 1 / 6,
        "lag0/regime1/clip_frac": 0.0,
        "lag0/regime1/is_weight_mean": 1.5,
        "lag0/regime2/token_frac": 1 / 6,
        "lag0/regime2/clip_frac": 1.0,
        "lag0/regime3/token_frac": 2 / 6,
        "lag0/regime3/clip_frac": 1 / 2,
        "lag0/regime3/is_weight_mean": (101 + 3) / 2,
        "lag0/regime4/token_frac": 0.0,
        "lag2/token_frac": 0.0,
    }
    for key, want in expected.items():
        assert metrics[key] == pytest.approx(want, rel=1e-9, abs=1e-12), key
    for k in (1, 2, 3, 4):  # the lags partition the tokens of every regime
        lagged = sum(metrics[f"lag{d}/regime{k}/token_frac"] for d in range(3))
        assert lagged == pytest.approx(metrics[f"regime{k}/token_frac"], rel=1e-12)


def test_token_lag_outside_the_declared_lags_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"1 response tokens have a version lag outside 0\.\.1"):
        run(batch_a(), get_preset("dispo"), token_lag=torch.tensor([[0, 0, 2], [0, 1, 0]]), num_lags=2)
    with pytest.raises(ValueError, match="num_lags=2 needs token_lag shaped like logprobs"):
        run(batch_a(), get_preset("dispo"), num_lags=2)
