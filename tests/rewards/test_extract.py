"""Answer extraction (DAPO `Answer:` line, last `\\boxed{}`, GSM8K `####`) and reference-answer reduction."""

from __future__ import annotations

import pytest

from megatron_dispo.rewards import extract_answer, last_boxed, reference_answer
from megatron_dispo.rewards.extract import match_brace, unwrap_boxed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{5}", "5"),
        ("a \\boxed{1} b \\boxed{\\frac{1}{2}} c", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed 5$.", "5"),
        ("\\fbox{x+1}", "x+1"),
        ("\\boxed{\\boxed{7}}", "7"),
        ("\\boxed{2} and \\boxed{3", None),
        ("no box", None),
        ("\\boxedfoo{3}", None),
    ],
)
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text) == expected


def test_match_brace_skips_escaped_braces_and_reports_unbalanced() -> None:
    text = "{a\\}b{c}}"
    assert match_brace(text, 0) == len(text) - 1
    assert match_brace("{{}", 0) is None
    with pytest.raises(ValueError, match="must be '\\{'"):
        match_brace("abc", 0)


def test_unwrap_boxed_keeps_partial_boxes() -> None:
    assert unwrap_boxed("\\boxed{\\boxed{x}}") == "x"
    assert unwrap_boxed("\\boxed{2} + 1") == "\\boxed{2} + 1"


@pytest.mark.parametrize(
    ("response", "answer_format", "expected"),
    [
        ("reasoning\nAnswer: 42", "dapo", "42"),
        ("Answer: $\\frac{1}{2}$.", "dapo", "\\frac{1}{2}"),
        ("**Answer:** 7", "dapo", "7"),
        ("Answer: 1\nAnswer: 2\n", "dapo", "2"),
        ("Final Answer: The final answer is $3$. I hope it is correct.", "dapo", "3"),
        ("... #### 1,234", "gsm8k", "1,234"),
        ("Answer: 1 then \\boxed{2}", "auto", "2"),
        ("\\boxed{2} then Answer: 1", "auto", "1"),
        ("\\boxed{2} then #### 3", "auto", "3"),
        ("Answer:   ", "dapo", None),
        ("\\boxed{}", "boxed", None),
        ("", "auto", None),
    ],
)
def test_extract_answer(response: str, answer_format: str, expected: str | None) -> None:
    assert extract_answer(response, answer_format) == expected  # type: ignore[arg-type]


def test_extract_answer_rejects_unknown_format_and_non_strings() -> None:
    with pytest.raises(ValueError, match="answer_format='latex'"):
        extract_answer("x", "latex")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="decode token ids"):
        extract_answer([1, 2], "auto")  # type: ignore[arg-type]


def test_reference_answer_reduces_solutions() -> None:
    assert reference_answer("She sells 9 eggs.\n#### 18") == "18"
    assert reference_answer("So $x = \\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert reference_answer("  \\frac{1}{2} ") == "\\frac{1}{2}"
    with pytest.raises(TypeError, match="str\\(\\)"):
        reference_answer(18)  # type: ignore[arg-type]
