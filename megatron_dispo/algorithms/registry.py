"""Name -> policy-loss registry.

A new loss is one decorated function plus a preset (see `presets.py`); nothing else needs to change. Every loss has
the `PolicyLossFn` signature and returns `LossTerms`, the per-token pieces that `losses.compute_policy_loss`
aggregates, differentiates and turns into telemetry.
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
    """Validated, detached views of the batch that every loss function reads. All tensors are [batch, seq] or
    broadcast to it ([batch, 1] for per-sequence quantities)."""

    logprobs: torch.Tensor
    """log pi_theta of the sampled tokens, detached (the gradient is applied by the caller)."""
    old_logprobs: torch.Tensor
    """log pi_old of the sampled tokens (the behaviour policy that generated them)."""
    log_ratio: torch.Tensor
    """(logprobs - old_logprobs) * mask: log r, exactly 0 on padding so padding sits in no regime. The loss function
    owns this buffer and may overwrite it in place (the caller has already read what it needs)."""
    advantages: torch.Tensor
    """[batch, 1] (per sequence) or [batch, seq] (per token)."""
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
    """What a loss function returns: the per-token loss and its derivative, before aggregation.

    With g_t = grad_coef_t * row_factor_b (row_factor = 1 when None), the aggregated loss is sum_t scale_t * l_t and
    its gradient w.r.t. logprobs_t is scale_t * g_t, where scale_t is the aggregation weight (mask / N for
    token-mean). Splitting g into a token part and a per-sequence part lets the REINFORCE-style losses keep A out of
    the [batch, seq] buffers. Losses return fresh tensors that the caller may modify in place.
    """

    grad_coef: torch.Tensor
    """Token part of d l_t / d logprobs_t, [batch, seq] (values on padding are ignored)."""
    row_factor: torch.Tensor | None
    """[batch, 1] per-sequence part of the derivative, or None for 1."""
    token_loss: torch.Tensor | None
    """Per-token loss [batch, seq]; None means the loss is linear in logprobs with a detached coefficient
    (REINFORCE-style: l_t = g_t * logprobs_t), which saves a pass."""
    regime_stats: torch.Tensor | None
    """Precomputed telemetry counts, float64 [2, 6]: rows positive / negative side, columns n(r>1), n(r<1),
    clipped n(r>1), clipped n(r<1), sum of IS weights over r>1, over r<1 (see telemetry.py). When None, telemetry
    is computed from the three fields below."""
    is_weight: torch.Tensor | None
    """The effective importance-sampling weight per token, detached (regime{k}/is_weight_mean)."""
    clipped: torch.Tensor | None
    """bool, True where the clip bound is active for that token, False on padding (clip_frac)."""
    regime_log_ratio: torch.Tensor | None
    """Masked log-ratio whose sign places a token in regime r>1 or r<1 (token-level r for token losses, the
    sequence / subsentence ratio for gspo / sspo)."""
    log_ratio_abs_sum: torch.Tensor | None = None
    """Sum over response tokens of abs(log r) (log_ratio_abs_mean). Required when the loss overwrote
    `inputs.log_ratio`; when None the caller computes it from the untouched buffer."""
    grad_coef_masked: bool = False
    """True when `grad_coef` is already 0 on padding (times the mask), so the caller skips its mask pass."""


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
