"""A step's loss metrics combined over its K mini-batch updates equal the metrics of all its tokens at once."""

from __future__ import annotations

import pytest
import torch

from megatron_dispo.algorithms import compute_policy_loss, get_preset
from megatron_dispo.algorithms.batch_metrics import combine_minibatch_metrics, lag_regime_metrics, staleness_metrics
from megatron_dispo.algorithms.telemetry import METRIC_KEYS


def _batch(rows: int, seq: int, seed: int, on_policy: bool) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(rows, seq, generator=generator) * 2.0
    shift = 0.0 if on_policy else 0.4
    old = logprobs + shift * torch.randn(rows, seq, generator=generator)
    lengths = torch.randint(2, seq + 1, (rows,), generator=generator)
    mask = (torch.arange(seq).unsqueeze(0) < lengths.unsqueeze(1)).float()
    advantages = torch.randn(rows, generator=generator)
    return logprobs * mask, old * mask, advantages, mask


def test_combined_updates_equal_the_whole_step() -> None:
    config = get_preset("dispo")
    # the first update is on-policy (r = 1: every regime empty), the others are not and differ in size
    parts = [_batch(6, 9, 0, True), _batch(4, 9, 1, False), _batch(8, 9, 2, False)]
    per_update = [compute_policy_loss(*part, config)[1] for part in parts]
    token_counts = [int(part[3].sum()) for part in parts]
    whole = [torch.cat(tensors) for tensors in zip(*parts, strict=True)]
    _, reference = compute_policy_loss(*whole, config)

    combined = combine_minibatch_metrics(
        [{**m, "grad_norm": g} for m, g in zip(per_update, (1.0, 2.0, 6.0), strict=True)], token_counts
    )
    for key in METRIC_KEYS:
        assert combined[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-7), key
    assert combined["grad_norm"] == pytest.approx(3.0)  # not a loss metric: plain mean over updates
    # the on-policy update reports 0 for every regime mean; a plain average would have diluted them
    assert per_update[0]["regime1/is_weight_mean"] == 0.0
    plain = sum(m["regime1/is_weight_mean"] for m in per_update) / 3
    assert combined["regime1/is_weight_mean"] > 1.0 > plain


def test_mismatched_lengths_are_an_error() -> None:
    with pytest.raises(ValueError, match="2 metric dicts but 1 token counts"):
        combine_minibatch_metrics([{"loss": 0.0}, {"loss": 1.0}], [3])


def test_staleness_metrics_per_sample_and_per_token() -> None:
    """Closed forms: staleness = trainer version - a sample's oldest token's version; the token lag averages over
    tokens."""
    one = staleness_metrics(5, torch.tensor([4, 4]))
    assert one["rollout/staleness/max"] == one["rollout/token_version_lag/mean"] == 1.0
    # partial rollouts: sample 0 started at version 3 and continued under 4; sample 1 is all version 4
    mixed = staleness_metrics(5, torch.tensor([3, 4]), token_version=torch.tensor([3, 3, 4, 4, 4, 4]))
    assert mixed["rollout/staleness/mean"] == 1.5 and mixed["rollout/staleness/max"] == 2.0
    assert mixed["rollout/token_version_lag/mean"] == pytest.approx(8 / 6)
    assert mixed["rollout/token_version_lag/max"] == 2.0


def test_lag_regime_metrics_are_fractions_of_each_lags_tokens() -> None:
    """``train/lag{d}/`` (fractions of all tokens) -> ``train/staleness{d}/`` (fractions of the lag-d tokens); a lag
    with no tokens is not reported, and the raw keys leave the step's metrics."""
    learned = {"train/regime1/token_frac": 0.25, "train/loss": 1.0}
    for lag, share in ((0, 0.0), (1, 0.75), (2, 0.25)):
        learned[f"train/lag{lag}/token_frac"] = share
        for k in (1, 2, 3, 4):
            learned[f"train/lag{lag}/regime{k}/token_frac"] = share / 4
            learned[f"train/lag{lag}/regime{k}/clip_frac"] = 0.1 * k
            learned[f"train/lag{lag}/regime{k}/is_weight_mean"] = 1.0 + lag
    out = lag_regime_metrics(learned)
    assert learned == {"train/regime1/token_frac": 0.25, "train/loss": 1.0}
    assert not any(key.startswith("train/staleness0/") for key in out)
    assert out["train/staleness1/token_frac"] == 0.75 and out["train/staleness2/token_frac"] == 0.25
    assert out["train/staleness1/regime3/token_frac"] == out["train/staleness2/regime3/token_frac"] == 0.25
    assert out["train/staleness2/regime4/clip_frac"] == pytest.approx(0.4)
    assert out["train/staleness2/regime1/is_weight_mean"] == 3.0
