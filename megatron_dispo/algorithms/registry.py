"""Name -> policy-loss registry.

A new loss is one decorated function plus a preset (see `presets.py`); nothing else needs to change. Every loss has
the `PolicyLossFn` signature: it reads `LossInputs` and returns `LossTerms`, its per-token loss (differentiable in
`logprobs`) and what the regime telemetry needs; `losses.compute_policy_loss` aggregates the loss and reports the
telemetry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch

if TYPE_CHECKING:
    from megatron_dispo.algorithms.loss_config import PolicyLossConfig

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


PolicyLossFn = Callable[[LossInputs, "PolicyLossConfig"], LossTerms]


@dataclass(frozen=True)
class RegisteredLoss:
    """A registered loss: the function and the aggregation its paper uses."""

    name: str
    fn: PolicyLossFn
    default_aggregation: Aggregation


POLICY_LOSSES: dict[str, RegisteredLoss] = {}


def register_policy_loss(name: str, *, aggregation: Aggregation) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Register `fn` under `name`; a second registration of the same name raises (no silent override)."""

    def add(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSSES:
            previous = POLICY_LOSSES[name].fn
            raise ValueError(
                f"policy loss {name!r} is already registered by {previous.__module__}.{previous.__qualname__}; "
                "pick a different name for the new loss."
            )
        if aggregation not in ("token_mean", "seq_mean_token_mean"):
            raise ValueError(
                f"aggregation={aggregation!r} for loss {name!r} is unknown; use 'token_mean' or 'seq_mean_token_mean'."
            )
        POLICY_LOSSES[name] = RegisteredLoss(name=name, fn=fn, default_aggregation=aggregation)
        return fn

    return add


def get_policy_loss(name: str) -> RegisteredLoss:
    """Look up a loss by name; the error lists every registered name."""
    _ensure_builtin_losses()
    if name not in POLICY_LOSSES:
        raise ValueError(f"loss_type={name!r} is not a registered policy loss; use one of {sorted(POLICY_LOSSES)}.")
    return POLICY_LOSSES[name]


def registered_loss_names() -> list[str]:
    """Sorted names of all registered losses (built-ins included)."""
    _ensure_builtin_losses()
    return sorted(POLICY_LOSSES)


def _ensure_builtin_losses() -> None:
    # The built-in losses register themselves on import; importing here lets the config validate loss_type
    # without the caller having imported losses.py first.
    from megatron_dispo.algorithms import losses  # noqa: F401
