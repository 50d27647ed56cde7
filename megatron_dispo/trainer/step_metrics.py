"""Per-step metrics that are not the loss's own: rewards, lengths, finish reasons, train/rollout mismatch."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import torch

from megatron_dispo.algorithms.mismatch import mismatch_from_sums, mismatch_sums
from megatron_dispo.algorithms.telemetry import METRIC_REDUCTIONS
from megatron_dispo.comm.channel import GroupChannel


def replica_refit_metrics(seconds_and_bytes: Sequence[Sequence[float]], tensor_parallel_size: int) -> dict[str, float]:
    """``refit/replica{i}/{time_s,bytes}`` from every rank's (seconds, payload bytes) in rank order: one row per
    replica, its leader's (the first of each ``tensor_parallel_size`` consecutive ranks)."""
    out: dict[str, float] = {}
    for replica, (seconds, payload_bytes) in enumerate(seconds_and_bytes[::tensor_parallel_size]):
        out[f"refit/replica{replica}/time_s"] = float(seconds)
        out[f"refit/replica{replica}/bytes"] = float(payload_bytes)
    return out


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


def mismatch_metrics(
    trainer_logprobs: Mapping[int, torch.Tensor], rollout_logprobs: Sequence[torch.Tensor], host_dp: GroupChannel
) -> dict[str, float]:
    """Train/rollout mismatch of this rank's sequences (``algorithms.mismatch``), reduced over the data-parallel
    ranks on their host group (each holds a share of the sequences)."""
    sums, max_abs = mismatch_sums((values, rollout_logprobs[index]) for index, values in trainer_logprobs.items())
    host_dp.all_reduce(sums)
    host_dp.all_reduce(max_abs, op="max")
    return mismatch_from_sums(sums, max_abs)


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
        reduction = METRIC_REDUCTIONS.get(key)
        if reduction is None or total_tokens <= 0:
            out[key] = sum(float(d[key]) for d in dicts) / len(dicts)
        elif reduction.kind == "sum":
            out[key] = weighted(key, [float(n) for n in token_counts])
        else:
            regime_tokens = [float(d[reduction.weight_key]) * n for d, n in zip(dicts, token_counts, strict=True)]
            out[key] = weighted(key, regime_tokens)
    return out
