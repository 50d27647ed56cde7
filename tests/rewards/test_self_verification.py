"""Every MATH-500 and GSM8K reference answer verifies against itself, and numeric gold + 1 is rejected."""

from __future__ import annotations

from fractions import Fraction

import pytest

from megatron_dispo.data import load_gsm8k, load_math500
from megatron_dispo.rewards import OutcomeCounts, VerifierPool, verify_batch


def _plus_one(answer: str) -> str | None:
    """gold + 1 for plain integer/decimal golds (computed with Fraction, independent of the verifier)."""
    text = answer.replace(",", "").strip()
    try:
        value = Fraction(text)
    except ValueError:
        return None
    shifted = value + 1
    return str(shifted.numerator) if shifted.denominator == 1 else str(float(shifted))


@pytest.mark.parametrize(
    ("loader", "template", "answer_format", "expected_count"),
    [
        (load_math500, "Let me think.\nThe final answer is $\\boxed{{{gold}}}$.", "boxed", 500),
        (lambda: load_gsm8k("test"), "She has 3 apples.\n#### {gold}", "gsm8k", 1319),
        (lambda: load_gsm8k("test"), "Work.\nAnswer: {gold}", "dapo", 1319),
    ],
    ids=["math500-boxed", "gsm8k-hash", "gsm8k-dapo"],
)
def test_gold_verifies_against_itself_and_gold_plus_one_is_rejected(
    shared_pool: VerifierPool, loader, template: str, answer_format: str, expected_count: int
) -> None:
    problems = loader()
    assert len(problems) == expected_count
    golds = [problem.answer for problem in problems]
    results = verify_batch(
        [template.format(gold=gold) for gold in golds], golds, answer_format=answer_format, timeout_s=30.0
    )
    counts = OutcomeCounts.from_results(results)
    failures = [(gold, result) for gold, result in zip(golds, results, strict=True) if not result.correct]
    assert counts.correct == expected_count, failures[:5]

    shifted = [(gold, _plus_one(gold)) for gold in golds]
    numeric = [(gold, wrong) for gold, wrong in shifted if wrong is not None]
    assert len(numeric) >= (300 if expected_count == 500 else 1319)
    wrong_results = verify_batch(
        [template.format(gold=wrong) for _, wrong in numeric],
        [gold for gold, _ in numeric],
        answer_format=answer_format,
        timeout_s=30.0,  # verdicts, not speed, are under test here
    )
    accepted = [pair for pair, result in zip(numeric, wrong_results, strict=True) if result.outcome != "incorrect"]
    assert not accepted, accepted[:5]
