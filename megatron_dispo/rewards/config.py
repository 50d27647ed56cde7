"""The ``reward:`` section of the run config: verification budget and what a verifier failure does to training."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["VERIFIER_FAILURE_POLICIES", "RewardConfig", "VerifierFailurePolicy"]

VerifierFailurePolicy = Literal["count_as_wrong", "drop"]
VERIFIER_FAILURE_POLICIES: tuple[str, ...] = ("count_as_wrong", "drop")


@dataclass(frozen=True)
class RewardConfig:
    """How responses are verified and how a verifier timeout/error enters the loss."""

    verify_timeout_s: float = 5.0
    """Hard wall-clock budget per answer once a verifier worker picks it up (``verify_batch(timeout_s=...)``); past
    it the worker is killed and the outcome is ``timeout``. The paper's runs use 5 s."""
    on_verifier_failure: VerifierFailurePolicy = "count_as_wrong"
    """What a ``timeout`` or ``error`` outcome means for training. ``count_as_wrong``: reward -1 like a wrong answer
    (the paper's behaviour). ``drop``: the response is removed from its group: zero weight in the loss and no part in
    its group's reward mean/std, so a verifier that cannot decide never pushes the policy either way."""
    failure_warn_fraction: float = 0.05
    """Warn when more than this share of a batch's responses are verifier failures (timeout + error); 1.0 never
    warns. A high share means the timeout is too short for the answers or the verifier is broken."""

    def __post_init__(self) -> None:
        timeout = self.verify_timeout_s
        if not _is_number(timeout) or not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(
                f"verify_timeout_s={timeout!r} must be a positive finite number of seconds; the paper uses 5.0."
            )
        if self.on_verifier_failure not in VERIFIER_FAILURE_POLICIES:
            raise ValueError(
                f"on_verifier_failure={self.on_verifier_failure!r} is not a policy; use one of "
                f"{list(VERIFIER_FAILURE_POLICIES)} ('count_as_wrong' gives reward -1, 'drop' removes the response)."
            )
        share = self.failure_warn_fraction
        if not _is_number(share) or not 0.0 <= share <= 1.0:
            raise ValueError(
                f"failure_warn_fraction={share!r} must be a fraction in [0, 1] (0.05 warns above 5% failures; "
                "1.0 never warns)."
            )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
