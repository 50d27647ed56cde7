"""Truncated importance sampling (TIS) between the rollout engine and the trainer.

Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training": vLLM samples with
pi_rollout, whose log-probs differ from the trainer's pi_old for the same weights (kernels, precision), so the
samples are slightly off-policy even for the first update. TIS reweights each token by min(pi_old / pi_rollout, C);
the cap C bounds the variance the correction adds.
"""

from __future__ import annotations

import math

import torch


def truncated_is_weights(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, response_mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """min(exp(old_logprobs - rollout_logprobs), cap) on response tokens, 1 elsewhere; a detached [n, T-1] tensor.

    Args:
        old_logprobs: [n, T-1] log pi_old of each target token (target-aligned, as the trainer's log-probs).
        rollout_logprobs: [n, T-1] log pi_rollout of the same tokens, as the engine reported them.
        response_mask: [n, T-1], 1 (or True) on response tokens; other positions may hold any value.
        cap: C > 0, the truncation of the weight.
    Returns:
        The per-token weight in the dtype of old_logprobs (float32 or wider); multiply it into the advantages.
    """
    for name, tensor in (("old_logprobs", old_logprobs), ("rollout_logprobs", rollout_logprobs)):
        if not isinstance(tensor, torch.Tensor) or not tensor.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating torch.Tensor, got {getattr(tensor, 'dtype', type(tensor))}.")
    if not isinstance(response_mask, torch.Tensor):
        raise TypeError(f"response_mask must be a torch.Tensor, got {type(response_mask).__name__}.")
    if rollout_logprobs.shape != old_logprobs.shape or response_mask.shape != old_logprobs.shape:
        raise ValueError(
            f"old_logprobs {list(old_logprobs.shape)}, rollout_logprobs {list(rollout_logprobs.shape)} and "
            f"response_mask {list(response_mask.shape)} must have one shape ([n, T-1], target-aligned)."
        )
    if isinstance(cap, bool) or not isinstance(cap, int | float) or not math.isfinite(cap) or cap <= 0:
        raise ValueError(f"cap={cap!r} must be a finite number > 0 (TIS uses e.g. 2.0).")
    dtype = torch.promote_types(old_logprobs.dtype, torch.float32)
    log_ratio = old_logprobs.detach().to(dtype) - rollout_logprobs.detach().to(dtype)
    weights = torch.exp(log_ratio).clamp(max=cap)
    return torch.where(response_mask.bool(), weights, torch.ones_like(weights))
