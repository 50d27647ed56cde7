"""Verification outcomes as training signals: per-step outcome shares, and the verifier-failure policy.

A timeout or error is not a wrong answer: the verifier could not decide. `outcome_fractions` makes its share visible
every step (``rollout/verify/{correct,incorrect,no_answer,timeout,error}``); `screen_verifier_failures` applies
``reward.on_verifier_failure`` (a validity mask for `algorithms.group_relative_advantages` and the loss) and says
when the share of failures is high enough to need a fix.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_dispo.rewards.config import RewardConfig
from megatron_dispo.rewards.verify import OUTCOMES, VERIFIER_FAILURES, OutcomeCounts, VerifyResult

__all__ = ["VERIFY_METRIC_PREFIX", "FailureScreen", "outcome_fractions", "screen_verifier_failures"]

VERIFY_METRIC_PREFIX = "rollout/verify/"


def outcome_fractions(
    results: Sequence[VerifyResult] | OutcomeCounts, *, prefix: str = VERIFY_METRIC_PREFIX
) -> dict[str, float]:
    """Share of each outcome, ``{prefix + outcome: fraction}`` for every name in `OUTCOMES` (all 0.0 when empty).

    Pass the results of one batch, or `OutcomeCounts` summed over several `verify_batch` calls (the dynamic-sampling
    rounds of one step) so the shares are over every sampled response.
    """
    counts = results if isinstance(results, OutcomeCounts) else OutcomeCounts.from_results(results)
    total = counts.total
    return {f"{prefix}{outcome}": getattr(counts, outcome) / total if total else 0.0 for outcome in OUTCOMES}


@dataclass(frozen=True)
class FailureScreen:
    """What `screen_verifier_failures` decided for one training batch."""

    valid: tuple[bool, ...]
    """Per response, in batch order: False where the response is dropped (only under ``on_verifier_failure='drop'``).
    It is the ``valid`` mask of `group_relative_advantages`; dropped rows must also get a zero loss mask."""
    num_failures: int
    """Responses with outcome ``timeout`` or ``error``."""
    failure_fraction: float
    """``num_failures / len(outcomes)`` (0.0 for an empty batch)."""
    warning: str | None
    """Set when ``failure_fraction`` exceeds ``failure_warn_fraction``: the share, the threshold and the fix."""


def screen_verifier_failures(outcomes: Sequence[str], config: RewardConfig) -> FailureScreen:
    """Apply ``config.on_verifier_failure`` to a batch's outcomes and check the failure share against its threshold.

    Args:
        outcomes: one outcome name per response (``VerifyResult.outcome``). Labels outside the verifier's vocabulary,
            such as the trainer's ``repetition``, are never failures.
        config: the run's ``reward:`` section.
    """
    if isinstance(outcomes, str) or not all(isinstance(outcome, str) for outcome in outcomes):
        raise TypeError("outcomes must be a sequence of outcome names (VerifyResult.outcome), one per response.")
    counts = Counter(outcomes)
    num_failures = sum(counts[failure] for failure in VERIFIER_FAILURES)
    fraction = num_failures / len(outcomes) if outcomes else 0.0
    drop = config.on_verifier_failure == "drop"
    valid = tuple(not (drop and outcome in VERIFIER_FAILURES) for outcome in outcomes)
    warning = None
    if fraction > config.failure_warn_fraction:
        breakdown = ", ".join(f"{counts[failure]} {failure}" for failure in VERIFIER_FAILURES)
        treatment = "dropped from their groups" if drop else "counted as wrong (reward -1)"
        warning = (
            f"verifier failures in {num_failures} of {len(outcomes)} responses ({fraction:.1%}: {breakdown}) exceed "
            f"reward.failure_warn_fraction={config.failure_warn_fraction}; they were {treatment} "
            f"(reward.on_verifier_failure={config.on_verifier_failure!r}). For timeouts raise reward.verify_timeout_s "
            f"(now {config.verify_timeout_s} s); for errors check that responses state a parsable final answer in "
            "data.answer_format (the VerifyResult.detail of each says what failed)."
        )
    return FailureScreen(valid=valid, num_failures=num_failures, failure_fraction=fraction, warning=warning)
