"""DAPO overlong reward shaping (arXiv 2503.14476, Eq. 13, "soft overlong punishment").

    penalty(L) = 0                                   if L <= L_max - L_cache
               = ((L_max - L_cache) - L) / L_cache   if L_max - L_cache < L <= L_max   (linear from 0 to -1)
               = -1                                  if L > L_max
    shaped reward = reward + factor * penalty(L)

DAPO's defaults: L_max = 20480, L_cache = 4096 (the expected length limit is 16384), factor 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OverlongConfig:
    """DAPO soft overlong punishment."""

    max_length: int = 20480
    """L_max: responses longer than this get the full penalty."""
    cache_length: int = 4096
    """L_cache: width of the linear ramp that ends at L_max."""
    factor: float = 1.0
    """Penalty multiplier (1 = penalty in [-1, 0])."""

    def __post_init__(self) -> None:
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"max_length={self.max_length!r} must be an int >= 1 (DAPO: 20480).")
        if isinstance(self.cache_length, bool) or not isinstance(self.cache_length, int):
            raise ValueError(f"cache_length={self.cache_length!r} must be an int (DAPO: 4096).")
        if not 1 <= self.cache_length <= self.max_length:
            raise ValueError(
                f"cache_length ({self.cache_length}) must be in [1, max_length ({self.max_length})]: the ramp starts "
                "at max_length - cache_length >= 0."
            )
        if not isinstance(self.factor, int | float) or isinstance(self.factor, bool) or not self.factor >= 0:
            raise ValueError(f"factor={self.factor!r} must be a number >= 0 (1.0 gives penalties in [-1, 0]).")


def overlong_penalty(lengths: torch.Tensor, config: OverlongConfig) -> torch.Tensor:
    """Penalty per response (<= 0), float32 [num_responses]; `lengths` are response token counts."""
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"lengths must be a torch.Tensor, got {type(lengths).__name__}.")
    if lengths.dim() != 1:
        raise ValueError(f"lengths has shape {list(lengths.shape)}; expected [num_responses] (1-D).")
    if bool((lengths < 0).any()):
        raise ValueError("lengths must be >= 0 (number of response tokens).")
    start = config.max_length - config.cache_length
    ramp = (start - lengths.to(torch.float64)) / config.cache_length  # 0 at start, -1 at max_length
    penalty = ramp.clamp(min=-1.0, max=0.0)
    return (config.factor * penalty).to(torch.float32)


def apply_overlong_penalty(rewards: torch.Tensor, lengths: torch.Tensor, config: OverlongConfig) -> torch.Tensor:
    """rewards + factor * penalty(lengths); the raw correctness used by dynamic sampling is left untouched."""
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}.")
    if not isinstance(lengths, torch.Tensor) or rewards.shape != lengths.shape:
        shape = list(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise ValueError(f"rewards {list(rewards.shape)} and lengths {shape} must be tensors of the same shape.")
    dtype = rewards.dtype if rewards.dtype.is_floating_point else torch.float32
    return rewards.to(dtype) + overlong_penalty(lengths, config).to(dtype)


def binary_rewards(correct: torch.Tensor) -> torch.Tensor:
    """The paper's outcome reward: +1 for a correct response, -1 otherwise (before overlong shaping)."""
    return torch.where(correct.to(torch.bool), 1.0, -1.0)
