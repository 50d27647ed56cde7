"""Score sampled responses per benchmark: verify every response, then compute the paper's metrics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from megatron_dispo.data.problem import ProblemSet
from megatron_dispo.eval.metrics import (
    avg_at_n,
    confidence_interval_95,
    maj_at_k,
    mean_pass_at_k,
    powers_of_two_up_to,
)
from megatron_dispo.eval.responses import ProblemResponses
from megatron_dispo.rewards import OutcomeCounts, VerifierPool, normalize_answer, verify_batch


@dataclass(frozen=True)
class BenchmarkResult:
    """Metrics of one benchmark (all accuracies are fractions in [0, 1])."""

    benchmark: str
    n: int
    """Responses scored per problem."""
    num_problems: int
    """Problems scored (those with responses)."""
    num_problems_total: int
    """Problems in the benchmark."""
    avg_at_n: float
    ci95: tuple[float, float]
    pass_at_k: dict[int, float]
    maj_at_k: dict[int, float]
    mean_response_length: float
    length_unit: str
    """"tokens" when lengths were given (generation does), else "chars"."""
    outcomes: dict[str, int]
    truncated_fraction: float | None = None
    """Fraction of responses that hit the length limit (finish_reason "length"), when known."""
    per_problem_correct: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ci95"] = list(self.ci95)
        data["pass_at_k"] = {str(k): v for k, v in self.pass_at_k.items()}
        data["maj_at_k"] = {str(k): v for k, v in self.maj_at_k.items()}
        return data


def score_benchmark(
    benchmark: str,
    problems: ProblemSet,
    responses: Mapping[str, ProblemResponses],
    *,
    n: int | None = None,
    answer_format: str = "auto",
    timeout_s: float = 5.0,
    pool: VerifierPool | None = None,
) -> BenchmarkResult:
    """Verify the responses of one benchmark and compute Avg@n, pass@k, maj@k (k = 1, 2, 4, ... <= n).

    Args:
        problems: the benchmark's problems (gold answers).
        responses: problem id -> sampled responses; ids must exist in `problems`, a subset is allowed.
        n: responses per problem to score (the first n); None: all, which must then be equally many.
    """
    by_id = problems.by_id()
    unknown = sorted(set(responses) - set(by_id))
    if unknown:
        raise ValueError(f"{benchmark}: response ids {unknown[:5]} are not problems of this benchmark.")
    if not responses:
        raise ValueError(f"{benchmark}: no responses to score.")
    counts = {problem_id: len(entry.responses) for problem_id, entry in responses.items()}
    if n is None:
        if len(set(counts.values())) != 1:
            raise ValueError(
                f"{benchmark}: problems have different numbers of responses ({sorted(set(counts.values()))}); "
                "pass --n to score the first n of each."
            )
        n = next(iter(counts.values()))
    short = {problem_id: count for problem_id, count in counts.items() if count < n}
    if short:
        raise ValueError(f"{benchmark}: n={n} but some problems have fewer responses: {dict(list(short.items())[:5])}")

    problem_ids = [problem.id for problem in problems if problem.id in responses]  # benchmark order
    flat_responses = [text for pid in problem_ids for text in responses[pid].responses[:n]]
    flat_golds = [by_id[pid].answer for pid in problem_ids for _ in range(n)]
    results = verify_batch(flat_responses, flat_golds, answer_format=answer_format, timeout_s=timeout_s, pool=pool)

    correct_counts: list[int] = []
    votes_per_problem = []
    for index, _ in enumerate(problem_ids):
        chunk = results[index * n : (index + 1) * n]
        correct_counts.append(sum(result.correct for result in chunk))
        votes_per_problem.append(
            [(None if r.extracted is None else normalize_answer(r.extracted), r.correct) for r in chunk]
        )
    samples = [n] * len(problem_ids)
    ks = powers_of_two_up_to(n)
    lengths, unit = _lengths(problem_ids, responses, n)
    finish = [entry.finish_reasons[:n] for entry in (responses[pid] for pid in problem_ids) if entry.finish_reasons]
    truncated = (
        sum(reason == "length" for reasons in finish for reason in reasons) / (n * len(finish)) if finish else None
    )
    return BenchmarkResult(
        benchmark=benchmark,
        n=n,
        num_problems=len(problem_ids),
        num_problems_total=len(problems),
        avg_at_n=avg_at_n(samples, correct_counts),
        ci95=confidence_interval_95([c / n for c in correct_counts]),
        pass_at_k={k: mean_pass_at_k(samples, correct_counts, k) for k in ks},
        maj_at_k={k: sum(maj_at_k(votes, k) for votes in votes_per_problem) / len(votes_per_problem) for k in ks},
        mean_response_length=sum(lengths) / len(lengths),
        length_unit=unit,
        outcomes=OutcomeCounts.from_results(results).as_dict(),
        truncated_fraction=truncated,
        per_problem_correct=dict(zip(problem_ids, correct_counts, strict=True)),
    )


def _lengths(problem_ids: list[str], responses: Mapping[str, ProblemResponses], n: int) -> tuple[list[int], str]:
    entries = [responses[pid] for pid in problem_ids]
    if all(entry.lengths is not None for entry in entries):
        return [length for entry in entries for length in entry.lengths[:n]], "tokens"  # type: ignore[index]
    return [len(text) for entry in entries for text in entry.responses[:n]], "chars"
