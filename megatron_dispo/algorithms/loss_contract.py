"""The contract between `compute_policy_loss` and every registered loss: what a loss reads and what it returns.

Its own module so imports point one way: loss_contract <- registry <- loss_config <- losses (the config validates
`loss_type` against the registry; the registry stores functions of this contract; losses.py implements them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

Aggregation = Literal["token_mean", "seq_mean_token_mean"]
"""How per-token losses become one scalar (see `aggregation.py`)."""


@dataclass(frozen=True)
class LossInputs:
    """Validated views of the batch that every loss function reads. All tensors are [batch, seq] or broadcast to it
    ([batch, 1] for per-sequence quantities); only `logprobs` and `log_ratio` carry a gradient."""

    logprobs: torch.Tensor
    """log pi_theta of the sampled tokens (float32 or wider), differentiable."""
    old_logprobs: torch.Tensor
    """log pi_old of the sampled tokens (the behaviour policy that generated them), detached."""
    log_ratio: torch.Tensor
    """(logprobs - old_logprobs) * mask: log r, differentiable, exactly 0 on padding so padding sits in no regime."""
    advantages: torch.Tensor
    """[batch, 1] (per sequence) or [batch, seq] (per token), detached."""
    mask: torch.Tensor
    """1.0 on response tokens, 0.0 elsewhere, in the dtype of `logprobs`."""
    side: torch.Tensor
    """+1 where the positive bound pair applies (A > 0, or correct), -1 for the negative pair, 0 for neither
    (A == 0 under advantage-sign conditioning). int8, [batch, 1] or [batch, seq]."""
    entropy: torch.Tensor | None
    """Optional per-token entropy of pi_theta, detached (sspo's adaptive bounds)."""
    segment_ids: torch.Tensor | None
    """Optional per-token subsentence ids (sspo)."""


class LossTerms(NamedTuple):
    """What a loss function returns, before aggregation. All [batch, seq]; values on padding are ignored."""

    token_loss: torch.Tensor
    """Per-token loss l_t; autograd differentiates it (IS weights the paper stops are detached inside)."""
    is_weight: torch.Tensor
    """The effective importance-sampling weight per token, detached (regime{k}/is_weight_mean)."""
    clipped: torch.Tensor
    """bool, True where the clip bound is active for that token, False on padding (clip_frac)."""
    regime_log_ratio: torch.Tensor
    """Masked log-ratio whose sign places a token in regime r>1 or r<1 (token-level r for token losses, the
    sequence / subsentence ratio for gspo / sspo), detached."""


PolicyLossFn = Callable[[LossInputs, Any], LossTerms]
"""A loss: (inputs, config) -> terms. The config is a `loss_config.PolicyLossConfig`; it is typed `Any` here because
the config module imports the registry (to validate `loss_type`), so this module cannot import the config."""
