"""The verification table: >= 150 hand-decided (response, gold, format, outcome) cases over all benchmark styles.

The whole table is verified in one batch per answer format (as training does), then each case is its own test.
"""

from __future__ import annotations

import pytest

from megatron_dispo.rewards import OutcomeCounts, VerifierPool, VerifyResult, verify_batch
from tests.rewards.cases import AIME, ALL_CASES, AMC, GSM8K, MATH500, MINERVA

# These tests check verdicts, not speed: a shared 2-core CI machine under load must not turn a slow sympy call into
# a timeout. Timeouts have their own tests (test_pool.py).
GENEROUS_TIMEOUT_S = 30.0


def test_table_covers_every_benchmark_style_with_enough_cases() -> None:
    assert len(ALL_CASES) >= 150
    assert len({param.id for param in ALL_CASES}) == len(ALL_CASES), "case ids key the results: keep them unique"
    for group in (AIME, AMC, MATH500, MINERVA, GSM8K):
        outcomes = {param.values[3] for param in group}
        assert {"correct", "incorrect"} <= outcomes, "each style needs equivalences and non-equivalences"


@pytest.fixture(scope="module")
def table_results(shared_pool: VerifierPool) -> dict[str, VerifyResult]:
    results: dict[str, VerifyResult] = {}
    for answer_format in ("auto", "dapo", "boxed", "gsm8k"):
        group = [param for param in ALL_CASES if param.values[2] == answer_format]
        verified = verify_batch(
            [param.values[0] for param in group],
            [param.values[1] for param in group],
            answer_format=answer_format,
            timeout_s=GENEROUS_TIMEOUT_S,
        )
        results.update({param.id: result for param, result in zip(group, verified, strict=True)})
    return results


@pytest.mark.parametrize(("response", "gold", "answer_format", "expected"), ALL_CASES)
def test_case(
    request: pytest.FixtureRequest,
    table_results: dict[str, VerifyResult],
    response: str,
    gold: str,
    answer_format: str,
    expected: str,
) -> None:
    case_id = request.node.callspec.id
    result = table_results[case_id]
    assert result.outcome == expected, f"{case_id}: extracted {result.extracted!r}, detail {result.detail!r}"
    assert result.reward == (1.0 if expected == "correct" else -1.0)
    if expected == "no_answer":
        assert result.extracted is None


def test_outcome_counts_aggregate_a_batch(shared_pool: VerifierPool) -> None:
    results = verify_batch(
        ["\\boxed{2}", "\\boxed{3}", "nothing here", "Answer: 2", "#### 5"], ["2", "2", "2", "2", "5"]
    )
    counts = OutcomeCounts.from_results(results)
    assert counts.as_dict() == {"correct": 3, "incorrect": 1, "no_answer": 1, "timeout": 0, "error": 0}
    assert counts.total == 5 and counts.accuracy == pytest.approx(0.6)
    assert (counts + counts).correct == 6


def test_verify_batch_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="one gold per response"):
        verify_batch(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="answer_format='latex'"):
        verify_batch(["a"], ["1"], answer_format="latex")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout_s=0"):
        verify_batch(["a"], ["1"], timeout_s=0)
    with pytest.raises(ValueError, match=r"golds\[1\] is empty"):
        verify_batch(["a", "b"], ["1", "  "])
    with pytest.raises(TypeError, match="lists of str"):
        verify_batch("a", "1")  # type: ignore[arg-type]
