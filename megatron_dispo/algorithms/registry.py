"""Name -> policy-loss registry.

A new loss is one decorated function plus a preset (see `presets.py`); nothing else needs to change. Every loss has
the `PolicyLossFn` signature: it reads `LossInputs` and returns `LossTerms`, its per-token loss (differentiable in
`logprobs`) and what the regime telemetry needs; `losses.compute_policy_loss` aggregates the loss and reports the
telemetry.

The built-in losses register themselves when `losses.py` is imported, which the package's `__init__` does first, so
any import from `megatron_dispo.algorithms` sees them. The registry imports no loss module itself: `loss_config`
imports the registry to validate `loss_type`, and `losses` imports `loss_config`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from megatron_dispo.algorithms.loss_contract import Aggregation, PolicyLossFn


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
    if name not in POLICY_LOSSES:
        raise ValueError(f"loss_type={name!r} is not a registered policy loss; use one of {sorted(POLICY_LOSSES)}.")
    return POLICY_LOSSES[name]


def registered_loss_names() -> list[str]:
    """Sorted names of all registered losses (built-ins included)."""
    return sorted(POLICY_LOSSES)
