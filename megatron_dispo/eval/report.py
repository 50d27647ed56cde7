"""Evaluation reports: one JSON file (everything, machine-readable) and one Markdown table (for humans)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_dispo.eval.harness import BenchmarkResult


def markdown_table(results: Sequence[BenchmarkResult]) -> str:
    """One row per benchmark: Avg@n with its 95% CI, pass@k and maj@k for the largest k, length, outcomes."""
    header = (
        "| benchmark | problems | n | Avg@n (%) | 95% CI (%) | pass@k (%) | maj@k (%) | mean length | "
        "correct / incorrect / no answer / timeout / error |"
    )
    lines = [header, "|" + "---|" * 9]
    for result in results:
        k_max = max(result.pass_at_k)
        passes = ", ".join(f"@{k}: {100 * v:.1f}" for k, v in sorted(result.pass_at_k.items()))
        outcomes = " / ".join(
            str(result.outcomes[key]) for key in ("correct", "incorrect", "no_answer", "timeout", "error")
        )
        lines.append(
            f"| {result.benchmark} | {result.num_problems}/{result.num_problems_total} | {result.n} | "
            f"{100 * result.avg_at_n:.2f} | [{100 * result.ci95[0]:.1f}, {100 * result.ci95[1]:.1f}] | {passes} | "
            f"@{k_max}: {100 * result.maj_at_k[k_max]:.1f} | {result.mean_response_length:.1f} {result.length_unit} "
            f"| {outcomes} |"
        )
    return "\n".join(lines) + "\n"


def write_report(results: Sequence[BenchmarkResult], out_dir: str | Path, config: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``eval_results.json`` and ``eval_results.md`` into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "eval_results.json"
    markdown_path = out_dir / "eval_results.md"
    payload = {"config": config, "benchmarks": {result.benchmark: result.to_dict() for result in results}}
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    markdown_path.write_text(f"# Evaluation\n\n{_config_line(config)}\n\n{markdown_table(results)}")
    return json_path, markdown_path


def _config_line(config: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in config.items() if value is not None)
