"""Files of pre-generated responses: one JSON object per line, one line per (benchmark, problem).

Fields: ``benchmark`` (name, e.g. "aime24"), ``id`` (the problem id in that benchmark), ``responses`` (list of
response texts) and optionally ``lengths`` (response lengths in tokens, same order) and ``finish_reasons``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_dispo.data.problem import MalformedRowError


@dataclass(frozen=True)
class ProblemResponses:
    """All sampled responses of one problem."""

    benchmark: str
    problem_id: str
    responses: list[str]
    lengths: list[int] | None = None
    """Response lengths in tokens (None: unknown; the report then uses characters)."""
    finish_reasons: list[str] | None = None


def read_responses_file(path: str | Path) -> dict[str, dict[str, ProblemResponses]]:
    """benchmark -> problem id -> responses; malformed lines raise `MalformedRowError` with the line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"responses file {path} does not exist")
    table: dict[str, dict[str, ProblemResponses]] = {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise MalformedRowError(path, line_number, f"invalid JSON ({error.msg})") from None
            entry = _parse_row(row, path, line_number)
            per_benchmark = table.setdefault(entry.benchmark, {})
            if entry.problem_id in per_benchmark:
                raise MalformedRowError(path, line_number, f"duplicate id {entry.problem_id!r} for {entry.benchmark}")
            per_benchmark[entry.problem_id] = entry
    return table


def _parse_row(row: object, path: Path, line_number: int) -> ProblemResponses:
    if not isinstance(row, dict):
        raise MalformedRowError(path, line_number, "each line must be a JSON object")
    for field in ("benchmark", "id", "responses"):
        if field not in row:
            raise MalformedRowError(path, line_number, f"missing field {field!r} (need benchmark, id, responses)")
    responses = row["responses"]
    if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
        raise MalformedRowError(path, line_number, "'responses' must be a non-empty list of strings")
    lengths = row.get("lengths", row.get("response_lengths"))
    if lengths is not None and (
        not isinstance(lengths, list)
        or len(lengths) != len(responses)
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in lengths)
    ):
        raise MalformedRowError(path, line_number, "'lengths' must list one non-negative int per response")
    finish_reasons = row.get("finish_reasons")
    if finish_reasons is not None and (not isinstance(finish_reasons, list) or len(finish_reasons) != len(responses)):
        raise MalformedRowError(path, line_number, "'finish_reasons' must list one string per response")
    return ProblemResponses(str(row["benchmark"]), str(row["id"]), responses, lengths, finish_reasons)
