"""Per-step metrics of a rollout batch and its updates, from plain tensors and metric dicts.

Rewards, lengths and finish reasons of the kept responses; the step's loss metrics combined over its K updates
(weighted as if over all the step's tokens, `telemetry.reduction_of`); the per-regime statistics by token version
lag.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import torch

from megatron_dispo.algorithms.telemetry import LAG_KEYS, REGIMES, reduction_of

__all__ = [
    "combine_minibatch_metrics",
    "finish_reason_metrics",
    "lag_regime_metrics",
    "reward_metrics",
    "staleness_metrics",
]


def reward_metrics(
    rewards: torch.Tensor, shaped: torch.Tensor, correct: torch.Tensor, lengths: torch.Tensor, advantages: torch.Tensor
) -> dict[str, float]:
    """Over the responses of the (filtered) training batch."""
    return {
        "rollout/reward/mean": float(rewards.mean()),
        "rollout/reward/shaped_mean": float(shaped.mean()),
        "rollout/batch_accuracy": float(correct.float().mean()),
        "rollout/response/len_mean": float(lengths.mean()),
        "rollout/response/len_max": float(lengths.max()),
        "rollout/response/len_correct_mean": float(lengths[correct].mean()) if bool(correct.any()) else 0.0,
        "rollout/advantage/abs_mean": float(advantages.abs().mean()),
        "rollout/num_responses": float(rewards.numel()),
    }


def finish_reason_metrics(finish_reasons: Sequence[str]) -> dict[str, float]:
    counts = Counter(finish_reasons)
    total = max(len(finish_reasons), 1)
    return {
        f"rollout/finish/{reason}_frac": counts.get(reason, 0) / total for reason in ("stop", "length", "repetition")
    }


def combine_minibatch_metrics(dicts: Sequence[Mapping[str, float]], token_counts: Sequence[int]) -> dict[str, float]:
    """The step's loss metrics from its K mini-batch updates, as if over all the step's response tokens.

    Each update reports fractions of its own tokens and means inside each regime. A plain mean over updates would
    count a regime's mean as 0 in an update where the regime is empty (always so in the first, on-policy update) and
    weigh small mini-batches like large ones, so: 'sum' metrics are weighted by the update's token count, regime means
    by the regime's token count in that update (`METRIC_REDUCTIONS`); other keys (grad norm, ...) are plain means.
    """
    if not dicts:
        return {}
    if len(dicts) != len(token_counts):
        raise ValueError(f"{len(dicts)} metric dicts but {len(token_counts)} token counts.")
    total_tokens = float(sum(token_counts))

    def weighted(key: str, weights: Sequence[float]) -> float:
        norm = sum(weights)
        return sum(float(d[key]) * w for d, w in zip(dicts, weights, strict=True)) / norm if norm > 0 else 0.0

    out: dict[str, float] = {}
    for key in dicts[0]:
        reduction = reduction_of(key)
        if reduction is None or total_tokens <= 0:
            out[key] = sum(float(d[key]) for d in dicts) / len(dicts)
        elif reduction.kind == "sum":
            out[key] = weighted(key, [float(n) for n in token_counts])
        else:
            regime_tokens = [float(d[str(reduction.weight_key)]) * n for d, n in zip(dicts, token_counts, strict=True)]
            out[key] = weighted(key, regime_tokens)
    return out


def staleness_metrics(
    trainer_version: int, policy_version: torch.Tensor, *, token_version: torch.Tensor | None = None
) -> dict[str, float]:
    """``rollout/staleness/{mean,max}`` and ``rollout/token_version_lag/{mean,max}``.

    Staleness = versions between a sample's oldest token's policy (``policy_version``, per sample) and the one it is
    trained from; the token-version lag is the same per token (``token_version``; without it every token of a sample
    has its sample's version).
    """
    staleness = trainer_version - policy_version
    lag = staleness if token_version is None else trainer_version - token_version
    return {
        "rollout/staleness/mean": float(staleness.float().mean()),
        "rollout/staleness/max": float(staleness.max()),
        "rollout/token_version_lag/mean": float(lag.float().mean()) if lag.numel() else 0.0,
        "rollout/token_version_lag/max": float(lag.max()) if lag.numel() else 0.0,
    }


def lag_regime_metrics(train_metrics: dict[str, float]) -> dict[str, float]:
    """``train/lag{d}/...`` (per-lag loss telemetry, fractions of all tokens) -> ``train/staleness{d}/...``: the
    lag-d share of the step's tokens and the regime statistics of the tokens sampled d versions before pi_old, with
    token fractions of the lag-d tokens. Only lags that hold tokens are reported; the ``lag`` keys are removed.

    A token's lag is per token, so a partial batch (tokens of several versions in one response) splits exactly; without
    partial rollouts every token of a batch has one lag and its ``staleness{d}`` statistics are the step's own.
    """
    out: dict[str, float] = {}
    lag = 0
    while f"train/lag{lag}/token_frac" in train_metrics:
        raw = {key: train_metrics.pop(f"train/lag{lag}/{key}") for key in LAG_KEYS}
        share = raw["token_frac"]
        if share > 0:
            out[f"train/staleness{lag}/token_frac"] = share
            for k in REGIMES:
                out[f"train/staleness{lag}/regime{k}/token_frac"] = raw[f"regime{k}/token_frac"] / share
                for name in ("clip_frac", "is_weight_mean"):
                    out[f"train/staleness{lag}/regime{k}/{name}"] = raw[f"regime{k}/{name}"]
        lag += 1
    return out
