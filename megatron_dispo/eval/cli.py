"""`megatron-dispo eval`: the paper's evaluation protocol (Appendix B) on AIME24/25, AMC23, MATH-500, Minerva.

Either samples with a model (`--model`, through the vLLM rollout engine) or scores a file of pre-generated
responses (`--responses`). Writes ``eval_results.json`` and ``eval_results.md`` into `--output-dir`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from megatron_dispo.data.problem import ProblemSet
from megatron_dispo.data.sources import BENCHMARK_LOADERS, EVAL_DATA_ENV, load_benchmark
from megatron_dispo.eval.harness import BenchmarkResult, score_benchmark
from megatron_dispo.eval.report import markdown_table, write_report
from megatron_dispo.eval.responses import ProblemResponses, read_responses_file
from megatron_dispo.rewards import ANSWER_FORMATS

DEFAULT_BENCHMARKS = "aime24,aime25,amc23,math500,minerva"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="HF checkpoint directory to sample from (needs vLLM)")
    source.add_argument("--responses", type=Path, help="JSONL of pre-generated responses (benchmark, id, responses)")
    parser.add_argument("--benchmarks", default=DEFAULT_BENCHMARKS, help=f"comma list of {sorted(BENCHMARK_LOADERS)}")
    parser.add_argument(
        "--n", "--num-samples", dest="n", type=int, default=None,
        help="responses per problem (default 16 with --model); under torchrun write --num-samples (torchrun reads "
        "--n as an abbreviation of its own options)",
    )  # fmt: skip
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (paper: 1.0)")
    parser.add_argument("--top-p", type=float, default=0.7, help="nucleus sampling mass (paper: 0.7)")
    parser.add_argument("--max-new-tokens", type=int, default=8192, help="response length limit in tokens")
    parser.add_argument("--max-model-len", type=int, default=None, help="default: max-new-tokens + 2048")
    parser.add_argument("--kv-cache-gib", type=float, default=4.0, help="vLLM KV cache size (CPU)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="vLLM weights dtype")
    parser.add_argument("--seed", type=int, default=0, help="base sampling seed (reproducible runs)")
    parser.add_argument(
        "--engine-tp", type=int, default=1, help="vLLM TP per replica (torchrun: one replica per group)"
    )
    parser.add_argument("--limit", type=int, default=None, help="first N problems per benchmark (smoke runs)")
    parser.add_argument("--eval-data-dir", type=Path, default=None, help=f"aime/amc JSONL folder (or ${EVAL_DATA_ENV})")
    parser.add_argument("--answer-format", choices=ANSWER_FORMATS, default="auto")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="hard verification timeout per answer")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/eval"))


def _load_problems(names: list[str], data_dir: Path | None, limit: int | None) -> dict[str, ProblemSet]:
    problems = {}
    for name in names:
        loaded = load_benchmark(name, data_dir)
        if limit is not None:
            loaded = ProblemSet(loaded.problems[:limit], loaded.source)
        problems[name] = loaded
    return problems


def _parse_benchmarks(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCHMARK_LOADERS]
    if unknown or not names:
        raise ValueError(f"--benchmarks {text!r}: unknown {unknown}; choose from {sorted(BENCHMARK_LOADERS)}.")
    return names


def _generate(
    args: argparse.Namespace, problems: dict[str, ProblemSet]
) -> dict[str, dict[str, ProblemResponses]] | None:
    """Rank 0's responses (written to responses.jsonl); None on the other ranks of a torchrun launch."""
    from megatron_dispo.eval.generation import GenerationSettings, generate_responses

    settings = GenerationSettings(
        n=args.n or 16,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        max_model_len=args.max_model_len or args.max_new_tokens + 2048,
        kv_cache_gib=args.kv_cache_gib,
        dtype=args.dtype,
        seed=args.seed,
        tensor_parallel_size=args.engine_tp,
    )
    generated = generate_responses(args.model, problems, settings)
    if generated is None:  # a serving rank: rank 0 scores and writes
        return None
    args.output_dir.mkdir(parents=True, exist_ok=True)
    with open(args.output_dir / "responses.jsonl", "w", encoding="utf-8") as handle:  # re-scorable later
        for name, per_problem in generated.items():
            for problem_id, entry in per_problem.items():
                row = {"benchmark": name, "id": problem_id, "responses": entry.responses, "lengths": entry.lengths}
                handle.write(json.dumps(row | {"finish_reasons": entry.finish_reasons}) + "\n")
    return generated


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, ImportError) as error:  # user errors: message, not a traceback
        print(f"megatron-dispo eval: error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    names = _parse_benchmarks(args.benchmarks)
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n {args.n} must be >= 1.")
    problems = _load_problems(names, args.eval_data_dir, args.limit)
    if args.model is not None:
        generated = _generate(args, problems)
        if generated is None:
            return 0
        responses = generated
    else:
        responses = read_responses_file(args.responses)
        missing = [name for name in names if name not in responses]
        if missing:
            raise ValueError(
                f"{args.responses} has no responses for {missing}; it has {sorted(responses)}. "
                "Pass --benchmarks with those only."
            )
    results: list[BenchmarkResult] = []
    for name in names:
        started = time.perf_counter()
        result = score_benchmark(
            name,
            problems[name],
            responses[name],
            n=args.n,
            answer_format=args.answer_format,
            timeout_s=args.timeout_s,
        )
        results.append(result)
        print(
            f"[eval] {name}: Avg@{result.n} {100 * result.avg_at_n:.2f}% over {result.num_problems} problems, "
            f"outcomes {result.outcomes} ({time.perf_counter() - started:.1f} s)"
        )
    config = {
        "model": str(args.model) if args.model else None,
        "responses": str(args.responses) if args.responses else None,
        "benchmarks": names,
        "n": args.n,
        "temperature": args.temperature if args.model else None,
        "top_p": args.top_p if args.model else None,
        "answer_format": args.answer_format,
    }
    json_path, markdown_path = write_report(results, args.output_dir, config)
    print(markdown_table(results), end="")
    print(f"[eval] wrote {json_path} and {markdown_path}")
    return 0
