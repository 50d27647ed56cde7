"""`verify_batch`: the one way rewards are computed (paper's R(o, a) in {-1, +1}).

Extraction runs in the calling process (cheap, linear-time); the equivalence check runs in the shared
`VerifierPool` under a hard per-answer deadline. Every response gets an explicit outcome, so a timeout or a
verifier error is visible in the counters instead of silently becoming a wrong answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from megatron_dispo.rewards.extract import ANSWER_FORMATS, AnswerFormat, extract_answer, reference_answer
from megatron_dispo.rewards.pool import VerifierPool, get_default_pool

Outcome = Literal["correct", "incorrect", "no_answer", "timeout", "error"]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)
"""The outcome vocabulary, in report order (metrics, eval tables and counters all use these names)."""
VERIFIER_FAILURES: tuple[Outcome, ...] = ("timeout", "error")
"""Outcomes where the verifier could not decide (as opposed to a decided wrong or missing answer)."""
REWARD_CORRECT = 1.0
REWARD_WRONG = -1.0


@dataclass(frozen=True)
class VerifyResult:
    """Verification of one response against its reference answer."""

    reward: float
    """R(o, a): +1 if the extracted answer is equivalent to the reference, else -1 (paper, Sec. 2)."""
    outcome: Outcome
    """Why: correct, incorrect, no_answer (nothing extracted), timeout (hard deadline hit), error (verifier failed)."""
    extracted: str | None
    """The final answer found in the response (None when `outcome == "no_answer"`)."""
    detail: str = ""
    """For timeout/error: what happened (worker killed, exception text)."""

    @property
    def correct(self) -> bool:
        return self.outcome == "correct"


@dataclass(frozen=True)
class OutcomeCounts:
    """Per-batch counters of verification outcomes (log them: a rise in timeouts or errors is a verifier bug)."""

    correct: int = 0
    incorrect: int = 0
    no_answer: int = 0
    timeout: int = 0
    error: int = 0

    @classmethod
    def from_results(cls, results: Sequence[VerifyResult]) -> OutcomeCounts:
        counts = dict.fromkeys(OUTCOMES, 0)
        for result in results:
            counts[result.outcome] += 1
        return cls(**counts)

    @property
    def total(self) -> int:
        return self.correct + self.incorrect + self.no_answer + self.timeout + self.error

    @property
    def accuracy(self) -> float:
        """Fraction correct (0.0 for an empty batch)."""
        return self.correct / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, int]:
        return {outcome: getattr(self, outcome) for outcome in OUTCOMES}

    def __add__(self, other: OutcomeCounts) -> OutcomeCounts:
        return OutcomeCounts(**{outcome: getattr(self, outcome) + getattr(other, outcome) for outcome in OUTCOMES})


def verify_batch(
    responses: list[str],
    golds: list[str],
    *,
    answer_format: AnswerFormat = "auto",
    timeout_s: float = 5.0,
    pool: VerifierPool | None = None,
) -> list[VerifyResult]:
    """Verify each response against its reference answer.

    Args:
        responses: decoded model responses (completion text only, not the prompt).
        golds: reference answers, one per response. Plain answers (``Problem.answer``) are used as is; a
            GSM8K solution ending in ``#### N`` or a MATH solution with ``\\boxed{}`` is reduced to its answer.
        answer_format: where the response states its answer: "dapo" (last ``Answer:`` line, paper Fig. 9),
            "boxed" (last ``\\boxed{}``, Fig. 10), "gsm8k" (``#### N``) or "auto" (whichever comes last).
        timeout_s: hard wall-clock budget per answer once a worker picks it up; past it the worker is killed
            and the outcome is "timeout".
        pool: the worker pool; default: the shared process-wide pool.

    Returns:
        One `VerifyResult` per response, in order.
    """
    if not isinstance(responses, (list, tuple)) or not isinstance(golds, (list, tuple)):
        raise TypeError(
            f"responses and golds must be lists of str, got {type(responses).__name__} and {type(golds).__name__}."
        )
    if len(responses) != len(golds):
        raise ValueError(
            f"len(responses)={len(responses)} != len(golds)={len(golds)}: pass one gold per response "
            "(repeat a prompt's gold for each of its G samples)."
        )
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format={answer_format!r} is not supported; use one of {list(ANSWER_FORMATS)}.")
    if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s!r} must be a positive number of seconds, e.g. 5.0.")

    extracted: list[str | None] = []
    pairs: list[tuple[str, str]] = []
    for index, (response, gold) in enumerate(zip(responses, golds, strict=True)):
        gold_answer = reference_answer(gold)
        if not gold_answer:
            raise ValueError(f"golds[{index}] is empty; every problem needs a reference answer to verify against.")
        answer = extract_answer(response, answer_format)
        extracted.append(answer)
        if answer is not None:
            pairs.append((gold_answer, answer))

    verdicts = (pool or get_default_pool()).check(pairs, timeout_s) if pairs else []
    verdict_iter = iter(verdicts)
    results: list[VerifyResult] = []
    for answer in extracted:
        if answer is None:
            results.append(VerifyResult(REWARD_WRONG, "no_answer", None))
            continue
        verdict, detail = next(verdict_iter)
        reward = REWARD_CORRECT if verdict == "correct" else REWARD_WRONG
        results.append(VerifyResult(reward, verdict, answer, detail))  # type: ignore[arg-type]
    return results
