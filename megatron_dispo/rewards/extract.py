"""Final-answer extraction from model responses and reference solutions.

Three answer styles are recognised, matching the prompt templates in `megatron_dispo.data.templates`:

- DAPO (paper Fig. 9): the last line of the response is ``Answer: <answer>``.
- Qwen3 boxed (paper Fig. 10): the answer is in the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``).
- GSM8K: the reference solution (and few-shot style responses) end with ``#### <answer>``.

Everything here is linear-time string scanning (no backtracking regexes over the whole response), so the parent
process can extract answers before dispatching the expensive equivalence check to the worker pool.
"""

from __future__ import annotations

import re
from typing import Literal

AnswerFormat = Literal["auto", "dapo", "boxed", "gsm8k"]
ANSWER_FORMATS: tuple[str, ...] = ("auto", "dapo", "boxed", "gsm8k")

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# `Answer:` with optional markdown emphasis around it, e.g. "**Answer:** 5" or "Final Answer: 5".
_ANSWER_LINE = re.compile(r"(?i)answer\s*(?:\*\*|__)?\s*:")
_GSM8K_MARK = re.compile(r"####")
_FINAL_ANSWER_PHRASE = re.compile(r"(?i)^\s*the final answer is\s*")
_HOPE_CORRECT = re.compile(r"(?i)\.?\s*I hope it is correct\.?\s*$")


def match_brace(text: str, open_index: int) -> int | None:
    """Return the index of the ``}`` closing the ``{`` at `open_index`, or None if unbalanced.

    Escaped braces (``\\{``, ``\\}``) are literal set braces in LaTeX and do not count.
    """
    if open_index >= len(text) or text[open_index] != "{":
        raise ValueError(f"match_brace: text[{open_index}] must be '{{', got {text[open_index : open_index + 1]!r}")
    depth = 0
    index = open_index
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2  # skip the escaped character (\{, \}, \\)
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index
        index += 1
    return None


def _boxed_argument(text: str, command_end: int) -> tuple[str, int] | None:
    """Argument of a box command ending at `command_end`, and the index just past it.

    The argument is ``{...}`` (nested braces kept) or, for ``\\boxed 5``, the next whitespace-free token.
    """
    index = command_end
    while index < len(text) and text[index] in " \t":
        index += 1
    if index >= len(text):
        return None
    if text[index] == "{":
        close = match_brace(text, index)
        return None if close is None else (text[index + 1 : close], close + 1)
    if index == command_end:  # "\boxed5" is not LaTeX for a box; a bare argument needs a space
        return None
    token = re.match(r"[^\s$]+", text[index:])
    if token is None:
        return None
    return token.group(0).rstrip(".,;"), index + token.end()


def last_boxed_with_position(text: str) -> tuple[str, int] | None:
    """Content and start index of the last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed X`` in `text`.

    Only the last box counts: a truncated last box (unbalanced braces) gives None rather than falling back to an
    earlier, intermediate box, so an unfinished response is never rewarded for a guess made half-way.
    """
    starts = [match for match in _BOX_COMMAND.finditer(text)]
    if not starts:
        return None
    last = starts[-1]
    argument = _boxed_argument(text, last.end())
    if argument is None:
        return None
    return unwrap_boxed(argument[0]).strip(), last.start()


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in `text` (nested braces kept), or None."""
    found = last_boxed_with_position(text)
    return None if found is None else found[0]


def unwrap_boxed(answer: str) -> str:
    """Strip boxes wrapped around a whole answer: ``\\boxed{\\boxed{5}}`` -> ``5``."""
    stripped = answer.strip()
    while True:
        match = _BOX_COMMAND.match(stripped)
        if match is None:
            return stripped
        argument = _boxed_argument(stripped, match.end())
        if argument is None:
            return stripped
        inner, end = argument
        if stripped[end:].strip():
            return stripped  # the box is only part of the answer, e.g. "\boxed{2} + 1"
        stripped = inner.strip()


def _clean_inline_answer(answer: str) -> str:
    """Tidy an answer taken from a line: markdown emphasis, `$...$`, Minerva's "The final answer is" phrasing."""
    answer = answer.strip()
    answer = _FINAL_ANSWER_PHRASE.sub("", answer)
    answer = _HOPE_CORRECT.sub("", answer)
    answer = answer.strip().strip("*_").strip()
    if answer.startswith("$") and answer.endswith("$") and len(answer) >= 2:
        answer = answer.strip("$").strip()
    elif (answer.startswith("\\(") and answer.endswith("\\)")) or (answer.startswith("\\[") and answer.endswith("\\]")):
        answer = answer[2:-2].strip()
    answer = answer.rstrip(".").strip()
    if answer.startswith("$") and answer.endswith("$") and len(answer) >= 2:
        answer = answer.strip("$").strip()
    return unwrap_boxed(answer)


def _after_last_marker(marker: re.Pattern[str], text: str) -> tuple[str, int] | None:
    """The cleaned text after the last ``marker`` up to the end of its line, and the marker's index."""
    last = None
    for last in marker.finditer(text):  # noqa: B007 (only the last match is used)
        pass
    if last is None:
        return None
    line_end = text.find("\n", last.end())
    rest = text[last.end() : line_end if line_end != -1 else len(text)]
    return _clean_inline_answer(rest), last.start()


def last_answer_line_with_position(text: str) -> tuple[str, int] | None:
    """DAPO format (Fig. 9): the text after the last ``Answer:`` up to the end of its line, and its index."""
    return _after_last_marker(_ANSWER_LINE, text)


def gsm8k_answer_with_position(text: str) -> tuple[str, int] | None:
    """GSM8K format: the text after the last ``####`` up to the end of its line, and its index."""
    return _after_last_marker(_GSM8K_MARK, text)


def extract_answer(response: str, answer_format: AnswerFormat = "auto") -> str | None:
    """Final answer in `response` for the given format; None when the response states no answer.

    ``auto`` takes whichever of the three styles appears last in the response: a model prompted with the DAPO
    template that nevertheless ends with a box is graded on its box, and vice versa.
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be str, got {type(response).__name__}; decode token ids before verifying.")
    if answer_format == "boxed":
        found = last_boxed_with_position(response)
    elif answer_format == "dapo":
        found = last_answer_line_with_position(response)
    elif answer_format == "gsm8k":
        found = gsm8k_answer_with_position(response)
    elif answer_format == "auto":
        candidates = [
            candidate
            for candidate in (
                last_boxed_with_position(response),
                last_answer_line_with_position(response),
                gsm8k_answer_with_position(response),
            )
            if candidate is not None and candidate[0]
        ]
        found = max(candidates, key=lambda candidate: candidate[1]) if candidates else None
    else:
        raise ValueError(f"answer_format={answer_format!r} is not supported; use one of {list(ANSWER_FORMATS)}.")
    if found is None or not found[0].strip():
        return None
    return found[0].strip()


def reference_answer(gold: str) -> str:
    """The final answer inside a reference: GSM8K ``#### N`` solutions and boxed MATH solutions are reduced.

    A plain answer string (the usual case: ``Problem.answer``) is returned stripped and unchanged.
    """
    if not isinstance(gold, str):
        raise TypeError(f"gold answer must be str, got {type(gold).__name__} ({gold!r}); convert numbers with str().")
    if "####" in gold:
        found = gsm8k_answer_with_position(gold)
        if found is not None and found[0]:
            return found[0]
    if _BOX_COMMAND.search(gold):
        boxed = last_boxed(gold)
        if boxed:
            return boxed
    return gold.strip()
