"""megatron_dispo.eval: the paper's evaluation protocol (Avg@n, pass@k, maj@k, 95% CI) and its CLI."""

from megatron_dispo.eval.harness import BenchmarkResult, score_benchmark
from megatron_dispo.eval.metrics import (
    avg_at_n,
    confidence_interval_95,
    maj_at_k,
    majority_correct,
    mean_pass_at_k,
    pass_at_k_unbiased,
    powers_of_two_up_to,
)
from megatron_dispo.eval.report import markdown_table, write_report
from megatron_dispo.eval.responses import ProblemResponses, read_responses_file

__all__ = [
    "BenchmarkResult",
    "ProblemResponses",
    "avg_at_n",
    "confidence_interval_95",
    "maj_at_k",
    "majority_correct",
    "markdown_table",
    "mean_pass_at_k",
    "pass_at_k_unbiased",
    "powers_of_two_up_to",
    "read_responses_file",
    "score_benchmark",
    "write_report",
]
