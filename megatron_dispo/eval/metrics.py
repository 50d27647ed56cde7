"""Evaluation metrics of the paper's protocol (Appendix B): Avg@n, unbiased pass@k, maj@k, a 95% CI.

All functions take per-problem data (one entry per problem) and return the mean over problems.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z_95 = 1.959963984540054
"""Two-sided 95% quantile of the standard normal."""


def pass_at_k_unbiased(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k for one problem (Chen et al. 2021, Eq. 1): 1 - C(n - c, k) / C(n, k).

    Computed as 1 - prod_{j = n - c + 1}^{n} (1 - k / j), which avoids huge binomials.
    """
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"num_correct={num_correct} must be in [0, num_samples={num_samples}].")
    if not 1 <= k <= num_samples:
        raise ValueError(f"k={k} must be in [1, num_samples={num_samples}]; sample more responses or lower k.")
    if num_samples - num_correct < k:
        return 1.0
    product = 1.0
    for j in range(num_samples - num_correct + 1, num_samples + 1):
        product *= 1.0 - k / j
    return 1.0 - product


def mean_pass_at_k(samples_per_problem: Sequence[int], correct_per_problem: Sequence[int], k: int) -> float:
    """Mean unbiased pass@k over problems."""
    _check_same_length(samples_per_problem, correct_per_problem)
    values = [pass_at_k_unbiased(n, c, k) for n, c in zip(samples_per_problem, correct_per_problem, strict=True)]
    return sum(values) / len(values)


def avg_at_n(samples_per_problem: Sequence[int], correct_per_problem: Sequence[int]) -> float:
    """Avg@n: the mean over problems of the fraction of correct samples (paper's headline metric, Avg@16)."""
    _check_same_length(samples_per_problem, correct_per_problem)
    return sum(c / n for n, c in zip(samples_per_problem, correct_per_problem, strict=True)) / len(samples_per_problem)


def confidence_interval_95(per_problem_accuracy: Sequence[float]) -> tuple[float, float]:
    """Normal-approximation 95% CI of the mean per-problem accuracy: mean +- 1.96 * s / sqrt(P).

    s is the sample standard deviation across problems (so sampling noise of both the problems and the n
    responses is included). With fewer than two problems the interval collapses to the mean.
    """
    count = len(per_problem_accuracy)
    if count == 0:
        raise ValueError("confidence_interval_95 needs at least one problem.")
    mean = sum(per_problem_accuracy) / count
    if count < 2:
        return mean, mean
    variance = sum((value - mean) ** 2 for value in per_problem_accuracy) / (count - 1)
    half_width = Z_95 * math.sqrt(variance / count)
    return max(0.0, mean - half_width), min(1.0, mean + half_width)


def majority_correct(votes: Sequence[tuple[str | None, bool]]) -> bool:
    """Is the most frequent answer among `votes` correct? One vote is (answer key or None, is correct).

    Correct answers all equal the reference, so they form one group whatever their spelling; wrong answers are
    grouped by their key (the normalised extracted answer). Responses without an answer (key None) do not vote.
    Ties go to the group seen first.
    """
    counts: dict[str, int] = {}
    first_seen: dict[str, int] = {}
    for position, (key, correct) in enumerate(votes):
        if key is None and not correct:
            continue
        group = "\x00correct" if correct else f"wrong:{key}"
        counts[group] = counts.get(group, 0) + 1
        first_seen.setdefault(group, position)
    if not counts:
        return False
    winner = max(counts, key=lambda group: (counts[group], -first_seen[group]))
    return winner == "\x00correct"


def maj_at_k(votes: Sequence[tuple[str | None, bool]], k: int) -> float:
    """maj@k for one problem: majority voting over each disjoint block of k consecutive samples, averaged.

    With n samples there are floor(n / k) blocks; using all of them (not just the first k samples) lowers the
    variance of the estimate.
    """
    if not 1 <= k <= len(votes):
        raise ValueError(f"k={k} must be in [1, number of samples={len(votes)}].")
    blocks = len(votes) // k
    return sum(majority_correct(votes[b * k : (b + 1) * k]) for b in range(blocks)) / blocks


def powers_of_two_up_to(n: int) -> list[int]:
    """[1, 2, 4, ..., n'] with n' <= n: the k values reported for pass@k and maj@k."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1.")
    return [2**e for e in range(int(math.log2(n)) + 1)]


def _check_same_length(samples: Sequence[int], correct: Sequence[int]) -> None:
    if len(samples) != len(correct) or not samples:
        raise ValueError(
            f"need one (samples, correct) pair per problem and at least one problem; got {len(samples)} and "
            f"{len(correct)}."
        )
