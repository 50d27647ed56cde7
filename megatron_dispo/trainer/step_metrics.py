"""Per-step metrics that are not the loss's own: rewards, lengths, finish reasons, train/rollout mismatch."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist


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
    trainer_logprobs: Mapping[int, Sequence[float]], rollout_logprobs: Sequence[Sequence[float]], policy: Any
) -> dict[str, float]:
    """Train/rollout mismatch of the sampled tokens: max |delta log p| and the k3 estimate of KL(rollout || train).

    delta = log pi_train - log pi_rollout on tokens sampled from the rollout engine, so
    k3 = exp(delta) - 1 - delta is an unbiased, non-negative estimator of KL(pi_rollout || pi_train).
    Reduced over data-parallel ranks (each holds a share of the sequences).
    """
    total = torch.zeros(3, dtype=torch.float64)  # sum |delta|, sum k3, token count
    max_abs = torch.zeros(1, dtype=torch.float64)
    for index, values in trainer_logprobs.items():
        delta = torch.tensor(values, dtype=torch.float64) - torch.tensor(rollout_logprobs[index], dtype=torch.float64)
        if delta.numel() == 0:
            continue
        total += torch.stack([delta.abs().sum(), (torch.expm1(delta) - delta).sum(), torch.tensor(delta.numel())])
        max_abs = torch.maximum(max_abs, delta.abs().max().reshape(1))
    if getattr(policy, "dp_size", 1) > 1:
        dist.all_reduce(total, group=policy.dp_group)
        dist.all_reduce(max_abs, op=dist.ReduceOp.MAX, group=policy.dp_group)
    count = max(float(total[2]), 1.0)
    return {
        "mismatch/logprob_abs_max": float(max_abs[0]),
        "mismatch/logprob_abs_mean": float(total[0]) / count,
        "mismatch/kl_k3": float(total[1]) / count,
    }


def average_dicts(dicts: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Key-wise mean over the K mini-batch updates of a step."""
    if not dicts:
        return {}
    return {key: sum(float(d[key]) for d in dicts) / len(dicts) for key in dicts[0]}
