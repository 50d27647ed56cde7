"""Local JSONL / Parquet problem files with configurable field names, and the DeepMind Mathematics text format.

Malformed rows raise `MalformedRowError` (file and line) unless the caller passes ``skip_malformed=True``, in which
case they are skipped and counted in the returned `ProblemSet`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from megatron_dispo.data.problem import MalformedRowError, Problem, ProblemSet

_MAX_KEPT_SKIP_REASONS = 100

AnswerGetter = Callable[[dict[str, Any]], str]


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed row or None, error or None) for each non-blank line of a JSONL file."""
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line), None
            except json.JSONDecodeError as error:
                yield line_number, None, f"invalid JSON ({error.msg} at column {error.colno})"


def iter_parquet(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """(row number starting at 1, row dict, None) for a Parquet file; needs pyarrow (imported only here)."""
    try:
        import pyarrow.parquet as parquet
    except ImportError as error:
        raise ImportError(
            f"reading {path} needs pyarrow, which is not installed; install it (pip install pyarrow) "
            "or convert the file to JSONL."
        ) from error
    for row_number, row in enumerate(parquet.read_table(path).to_pylist(), start=1):
        yield row_number, row, None


def _field_text(row: dict[str, Any], field: str) -> str:
    if field not in row:
        raise KeyError(f"missing field {field!r} (row has {sorted(row)})")
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise KeyError(f"field {field!r} must be a string or number, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise KeyError(f"field {field!r} is empty")
    return text


def load_problem_file(
    path: str | Path,
    *,
    source: str | None = None,
    problem_field: str = "problem",
    answer_field: str = "answer",
    id_field: str | None = "id",
    answer_getter: AnswerGetter | None = None,
    skip_malformed: bool = False,
) -> ProblemSet:
    """Problems from a local ``.jsonl`` or ``.parquet`` file.

    Args:
        path: the file; the suffix picks the reader.
        source: name stored in `Problem.source` (default: the file stem).
        problem_field, answer_field: row fields holding the statement and the final answer.
        id_field: row field holding a unique id; None (or a row without it) uses ``"{source}-{row index}"``.
        answer_getter: derives the answer from the whole row instead of `answer_field` (e.g. the last
            ``\\boxed{}`` of a MATH solution); it raises KeyError/ValueError for a row without an answer.
        skip_malformed: skip and count malformed rows instead of raising `MalformedRowError`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"problem file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = iter_jsonl(path)
    elif suffix == ".parquet":
        rows = iter_parquet(path)
    else:
        raise ValueError(f"{path}: unsupported suffix {suffix!r}; use .jsonl or .parquet (or convert the file).")
    source = source or path.stem
    result = ProblemSet(problems=[], source=source)
    for row_index, (line_number, row, parse_error) in enumerate(rows):
        try:
            if parse_error is not None:
                raise KeyError(parse_error)
            if not isinstance(row, dict):
                raise KeyError(f"row must be a JSON object, got {type(row).__name__}")
            problem_text = _field_text(row, problem_field)
            answer = answer_getter(row) if answer_getter is not None else _field_text(row, answer_field)
            if id_field is not None and id_field in row and row[id_field] is not None:
                problem_id = str(row[id_field])
            else:
                problem_id = f"{source}-{row_index}"
            result.problems.append(Problem(id=problem_id, problem=problem_text, answer=answer, source=source))
        except (KeyError, ValueError, TypeError) as error:
            reason = error.args[0] if error.args else str(error)
            if not skip_malformed:
                raise MalformedRowError(path, line_number, str(reason)) from None
            result.skipped += 1
            if len(result.skipped_rows) < _MAX_KEPT_SKIP_REASONS:
                result.skipped_rows.append(f"{path}:{line_number}: {reason}")
    return result


def load_deepmind_mathematics(
    root: str | Path,
    *,
    modules: list[str] | None = None,
    split: str = "train-easy",
    limit_per_module: int | None = None,
    skip_malformed: bool = False,
) -> ProblemSet:
    """DeepMind Mathematics (Saxton et al. 2019) from its released text files: question and answer on alternate lines.

    Layout: ``{root}/{split}/{module}.txt`` (e.g. ``train-easy/arithmetic__add_or_sub.txt``). `modules` selects
    files by stem (default: all in the split). Ids are ``"{module}-{pair index}"``.
    """
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise FileNotFoundError(
            f"{split_dir} is not a directory; point root at the unpacked mathematics_dataset-v1.0 folder "
            "(it holds train-easy/, train-medium/, train-hard/, interpolate/, extrapolate/)."
        )
    available = sorted(file.stem for file in split_dir.glob("*.txt"))
    selected = available if modules is None else modules
    unknown = sorted(set(selected) - set(available))
    if unknown:
        raise ValueError(f"modules {unknown} not found in {split_dir}; available: {available[:20]}...")
    result = ProblemSet(problems=[], source=f"deepmind_math/{split}")
    for module in selected:
        path = split_dir / f"{module}.txt"
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        pairs = len(lines) // 2
        if len(lines) % 2:
            reason = f"odd number of lines ({len(lines)}): the last question has no answer line"
            if not skip_malformed:
                raise MalformedRowError(path, len(lines), reason)
            result.skipped += 1
            result.skipped_rows.append(f"{path}:{len(lines)}: {reason}")
        for pair in range(pairs if limit_per_module is None else min(pairs, limit_per_module)):
            question, answer = lines[2 * pair].strip(), lines[2 * pair + 1].strip()
            if not question or not answer:
                reason = "empty question or answer line"
                if not skip_malformed:
                    raise MalformedRowError(path, 2 * pair + 1, reason)
                result.skipped += 1
                if len(result.skipped_rows) < _MAX_KEPT_SKIP_REASONS:
                    result.skipped_rows.append(f"{path}:{2 * pair + 1}: {reason}")
                continue
            result.problems.append(
                Problem(id=f"{module}-{pair}", problem=question, answer=answer, source=result.source)
            )
    return result
