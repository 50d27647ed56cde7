"""Config -> problems: the training mixture and the held-out set (the trainer's only contact with data loaders)."""

from __future__ import annotations

from megatron_dispo.config import DataConfig, DataSourceConfig
from megatron_dispo.data.chained_arithmetic import generate_chained_arithmetic
from megatron_dispo.data.files import load_deepmind_mathematics, load_problem_file
from megatron_dispo.data.mixture import MixtureSource, ProblemMixture
from megatron_dispo.data.problem import Problem, ProblemSet
from megatron_dispo.data.sources import load_benchmark, load_from_hub, load_gsm8k, load_math
from megatron_dispo.data.synthetic import generate_arithmetic


def load_source(source: DataSourceConfig) -> list[Problem]:
    """All problems of one configured source (``limit`` applied)."""
    kind = source.kind
    if kind == "synthetic_arithmetic":
        problems: ProblemSet | list[Problem] = generate_arithmetic(
            source.num_problems, source.difficulty, seed=source.seed
        )
    elif kind == "synthetic_chain":
        problems = generate_chained_arithmetic(source.num_problems, source.difficulty, seed=source.seed)
    elif kind == "gsm8k":
        problems = load_gsm8k(source.split, skip_malformed=source.skip_malformed)
    elif kind == "math":
        problems = load_math(source.split, skip_malformed=source.skip_malformed)
    elif kind in ("math500", "minerva", "aime24", "aime25", "amc23"):
        problems = load_benchmark(kind, source.path)
    elif kind in ("jsonl", "parquet"):
        problems = load_problem_file(
            source.path,
            problem_field=source.problem_field,
            answer_field=source.answer_field,
            source=source.mixture_name,
            skip_malformed=source.skip_malformed,
        )
    elif kind == "deepmind":
        problems = load_deepmind_mathematics(source.path, skip_malformed=source.skip_malformed)
    else:  # "hub"
        problems = load_from_hub(source.name or "")
    problems = list(problems)
    return problems[: source.limit] if source.limit is not None else problems


def build_mixture(config: DataConfig) -> ProblemMixture:
    sources = [MixtureSource(s.mixture_name, load_source(s), s.weight) for s in config.train]
    return ProblemMixture(sources, seed=config.seed)


def load_heldout(config: DataConfig, max_problems: int | None) -> list[Problem]:
    if config.heldout is None:
        return []
    problems = load_source(config.heldout)
    return problems[:max_problems] if max_problems is not None else problems
