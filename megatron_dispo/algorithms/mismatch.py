"""Train/rollout mismatch of the sampled tokens: how far the trainer's log-probs are from the engine's.

delta = log pi_train - log pi_rollout on tokens sampled from the rollout engine, so k3 = exp(delta) - 1 - delta is an
unbiased, non-negative estimator of KL(pi_rollout || pi_train) (Schulman's k3). The sums are additive over
sequences and ranks (the max is reduced with MAX), so a data-parallel job reduces :func:`mismatch_sums` and reads the
metrics with :func:`mismatch_from_sums`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["k3_kl", "mismatch_from_sums", "mismatch_sums"]


def k3_kl(delta: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_rollout || pi_train) from delta = log pi_train - log pi_rollout."""
    return torch.expm1(delta) - delta


def mismatch_sums(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums float64 [3]: sum |delta|, sum k3, token count; max |delta| float64 [1]) over (trainer, rollout) pairs."""
    sums = torch.zeros(3, dtype=torch.float64)
    max_abs = torch.zeros(1, dtype=torch.float64)
    for trainer, rollout in pairs:
        delta = torch.as_tensor(trainer, dtype=torch.float64) - torch.as_tensor(rollout, dtype=torch.float64)
        if delta.numel() == 0:
            continue
        sums += torch.stack([delta.abs().sum(), k3_kl(delta).sum(), torch.tensor(float(delta.numel()))])
        max_abs = torch.maximum(max_abs, delta.abs().max().reshape(1))
    return sums, max_abs


def mismatch_from_sums(sums: torch.Tensor, max_abs: torch.Tensor) -> dict[str, float]:
    """``mismatch/logprob_abs_{max,mean}`` and ``mismatch/kl_k3`` (means per token)."""
    count = max(float(sums[2]), 1.0)
    return {
        "mismatch/logprob_abs_max": float(max_abs[0]),
        "mismatch/logprob_abs_mean": float(sums[0]) / count,
        "mismatch/kl_k3": float(sums[1]) / count,
    }
