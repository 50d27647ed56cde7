"""Minerva/MATH normalisation used by the string-match fallback (expected strings written by hand)."""

from __future__ import annotations

import pytest

from megatron_dispo.rewards import normalize_answer, strings_match


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("x = 5", "5"),
        ("\\text{(C)}", "(C)"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\frac12", "\\frac{1}{2}"),
        ("\\frac1{10}", "\\frac{1}{10}"),
        ("\\sqrt3", "\\sqrt{3}"),
        ("1,000,000", "1000000"),
        ("10{,}000", "10000"),
        ("5 \\text{ cm}", "5"),
        ("30^\\circ", "30"),
        ("30^{\\circ}", "30"),
        ("50\\%", "50"),
        ("\\$18.90", "18.9"),
        ("18.", "18"),
        ("007", "7"),
        ("-0.0", "0"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("45 degrees", "45"),
        ("1,2", "1,2"),
        ("x \\leq 3", "x\\leq3"),
        ("\\sqrt{2}", "\\sqrt{2}"),
    ],
)
def test_normalize_answer(answer: str, expected: str) -> None:
    assert normalize_answer(answer) == expected


def test_strings_match_never_matches_empty_answers() -> None:
    assert not strings_match("", "")
    assert not strings_match("\\text{}", "")
    assert strings_match("\\frac{1}{2}", "\\dfrac12")
    assert not strings_match("12", "1,2")
