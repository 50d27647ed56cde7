"""Metrics against hand-computed values (binomials worked out by hand in the comments)."""

from __future__ import annotations

import pytest

from megatron_dispo.eval import (
    avg_at_n,
    confidence_interval_95,
    maj_at_k,
    majority_correct,
    mean_pass_at_k,
    pass_at_k_unbiased,
    powers_of_two_up_to,
)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (16, 2, 4, 819 / 1820),  # 1 - C(14,4)/C(16,4) = 1 - 1001/1820
        (16, 4, 8, 25 / 26),  # 1 - C(12,8)/C(16,8) = 1 - 495/12870 = 1 - 1/26
        (10, 3, 1, 0.3),  # pass@1 = c / n
        (16, 1, 16, 1.0),  # one correct sample among all 16 drawn
        (5, 0, 3, 0.0),
        (5, 5, 1, 1.0),
        (16, 6, 2, 1 - 45 / 120),  # 1 - C(10,2)/C(16,2)
    ],
)
def test_pass_at_k_unbiased(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k_unbiased(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_impossible_inputs() -> None:
    with pytest.raises(ValueError, match="k=17"):
        pass_at_k_unbiased(16, 1, 17)
    with pytest.raises(ValueError, match="num_correct=5"):
        pass_at_k_unbiased(4, 5, 1)


def test_avg_and_mean_pass() -> None:
    assert avg_at_n([4, 4], [1, 3]) == pytest.approx(0.5)
    assert mean_pass_at_k([4, 4], [1, 3], 2) == pytest.approx((0.5 + 1.0) / 2)  # 1 - C(1,2)/C(4,2) = 1 for c=3
    with pytest.raises(ValueError, match="one \\(samples, correct\\) pair"):
        avg_at_n([4], [1, 2])


def test_confidence_interval() -> None:
    # mean 0.5; sample var = (0 + 0.0625 + 0.0625 + 0) / 3; se = sqrt(var / 4) = 0.1020621; 1.959964 * se = 0.2000376
    low, high = confidence_interval_95([0.5, 0.25, 0.75, 0.5])
    assert (low, high) == pytest.approx((0.2999624, 0.7000376), abs=1e-6)
    assert confidence_interval_95([0.0, 1.0]) == (0.0, 1.0)  # +-0.98 around 0.5, clipped
    assert confidence_interval_95([0.3]) == (0.3, 0.3)


def test_majority_vote() -> None:
    assert not majority_correct([("5", False), ("5", False), ("7", True)])
    assert majority_correct([("7", True), ("5", False)])  # tie: first seen wins
    assert not majority_correct([("5", False), ("7", True)])
    assert majority_correct([(None, False), (None, False), ("3", True)])  # no answer does not vote
    assert majority_correct([("0.5", True), ("\\frac{1}{2}", True), ("2", False), ("2", False), ("3", False)])
    assert not majority_correct([(None, False)])


def test_maj_at_k_averages_disjoint_blocks() -> None:
    votes = [("1", True), ("2", False), ("2", False), ("2", False)]
    assert maj_at_k(votes, 1) == pytest.approx(0.25)
    assert maj_at_k(votes, 2) == pytest.approx(0.5)  # blocks (T, F): tie -> T; (F, F) -> F
    assert maj_at_k(votes, 4) == 0.0


def test_powers_of_two() -> None:
    assert powers_of_two_up_to(16) == [1, 2, 4, 8, 16]
    assert powers_of_two_up_to(10) == [1, 2, 4, 8]
    assert powers_of_two_up_to(1) == [1]
