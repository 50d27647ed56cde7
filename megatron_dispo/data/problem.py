"""The one record type every dataset loader produces, and the error raised for malformed rows."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    """One math problem with its reference answer."""

    id: str
    """Unique within its source, stable across runs (used for resumption, eval reports and response files)."""
    problem: str
    """The problem statement, without any prompt template (see `megatron_dispo.data.templates`)."""
    answer: str
    """The final reference answer only (no solution text): what `rewards.verify_batch` compares against."""
    source: str
    """Dataset name, e.g. "math500", "gsm8k/train", "synthetic/arithmetic"."""

    def __post_init__(self) -> None:
        for name in ("id", "problem", "answer", "source"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"Problem.{name} must be str, got {type(value).__name__} ({value!r}).")
        if not self.answer.strip():
            raise ValueError(f"Problem {self.source}:{self.id} has an empty answer; every problem needs one.")
        if not self.problem.strip():
            raise ValueError(f"Problem {self.source}:{self.id} has an empty problem statement.")


class MalformedRowError(ValueError):
    """A data row that cannot become a `Problem`; names the file and line so the row can be fixed."""

    def __init__(self, path: str | Path, line: int, reason: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        super().__init__(
            f"{path}:{line}: {reason}. Fix the row, or pass skip_malformed=True to skip and count such rows."
        )


@dataclass
class ProblemSet(Sequence[Problem]):
    """Problems loaded from one source, plus what was skipped (when the caller asked to skip malformed rows)."""

    problems: list[Problem]
    source: str
    skipped: int = 0
    skipped_rows: list[str] = field(default_factory=list)
    """"path:line: reason" for each skipped row (first 100 kept)."""

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, index: int) -> Problem:  # type: ignore[override]
        return self.problems[index]

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)

    def by_id(self) -> dict[str, Problem]:
        """Problems keyed by id; raises on duplicate ids (they would make eval reports ambiguous)."""
        table: dict[str, Problem] = {}
        for problem in self.problems:
            if problem.id in table:
                raise ValueError(f"duplicate problem id {problem.id!r} in source {self.source!r}; ids must be unique.")
            table[problem.id] = problem
        return table
