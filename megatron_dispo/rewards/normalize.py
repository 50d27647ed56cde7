"""Minerva/MATH-style normalisation of final answers for the string-match fallback.

Follows the normalisation described for Minerva (Lewkowycz et al. 2022, Appendix D.1) and used by the DAPO
reward: keep the right-hand side of an equation, drop units and filler words, unwrap ``\\text{}``/``\\boxed{}``,
canonicalise ``\\dfrac``/``\\tfrac``/shorthand fractions and square roots, remove thousands separators, trailing
periods, degree and percent signs and all whitespace. Two answers whose normalised strings are equal and
non-empty are treated as equivalent; math-verify handles everything that needs mathematics.
"""

from __future__ import annotations

import re

from megatron_dispo.rewards.extract import match_brace

# Words and LaTeX fragments that carry no mathematical value in a final answer (units, fillers, spacing).
_REMOVED_UNIT_WORDS: tuple[str, ...] = (
    "square",
    "ways",
    "integers",
    "dollars",
    "mph",
    "inches",
    "inch",
    "feet",
    "ft",
    "hours",
    "hour",
    "km",
    "units",
    "unit",
    "points",
    "minutes",
    "seconds",
    "digits",
    "cents",
    "degrees",
    "degree",
    "cm",
    "meters",
    "meter",
    "pounds",
    "students",
    "edges",
    "multiples",
    "sq",
)
_REMOVED_FRAGMENTS: tuple[str, ...] = (
    "\\ldots",
    "\\dots",
    "\\cdots",
    "\\!",
    "\\,",
    "\\;",
    "\\:",
    "\\quad",
    "\\qquad",
    "\\left",
    "\\right",
    "\\displaystyle",
    "^\\circ",
    "^{\\circ}",
    "\\circ",
    "\\degree",
    "\\%",
    "%",
    "\\$",
    "{,}",
    "\\mathrm{th}",
    '"',
)
_TEXT_LIKE_COMMANDS: tuple[str, ...] = ("\\text", "\\textbf", "\\textit", "\\mathrm", "\\mathbf", "\\mbox", "\\boxed")
_UNIT_WORD_PATTERN = re.compile(r"(?<![A-Za-z\\])(?:" + "|".join(_REMOVED_UNIT_WORDS) + r")(?![A-Za-z])")
_THOUSANDS_NUMBER = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_SHORTHAND_FRAC = re.compile(r"\\frac(?![A-Za-z])\s*([0-9A-Za-z])\s*([0-9A-Za-z])")
_HALF_SHORTHAND_FRAC = re.compile(r"\\frac(?![A-Za-z])\s*([0-9A-Za-z])\s*(?=\{)")
_SHORTHAND_SQRT = re.compile(r"\\sqrt(?![A-Za-z])\s*([0-9A-Za-z])")
_RELATION_SPLIT = re.compile(r"(?<![<>!\\])=")


def unwrap_command(text: str, command: str) -> str:
    """Replace every ``\\command{X}`` by ``X`` (nested braces handled), e.g. ``\\text{ cm}`` -> `` cm``."""
    pattern = re.compile(re.escape(command) + r"(?![A-Za-z])\s*\{")
    while True:
        match = pattern.search(text)
        if match is None:
            return text
        open_index = match.end() - 1
        close = match_brace(text, open_index)
        if close is None:
            return text[: match.start()] + text[open_index + 1 :]
        text = text[: match.start()] + text[open_index + 1 : close] + text[close + 1 :]


def normalize_answer(answer: str) -> str:
    """Canonical string form of a final answer (Minerva normalisation); see the module docstring."""
    text = answer.strip()
    # Keep only the right-hand side of an assignment such as "x = 5" (not of <=, >=, !=, \neq).
    parts = _RELATION_SPLIT.split(text)
    if len(parts) > 1 and "," not in text:
        text = parts[-1]
    for command in _TEXT_LIKE_COMMANDS:
        text = unwrap_command(text, command)
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for fragment in _REMOVED_FRAGMENTS:
        text = text.replace(fragment, "")
    text = _UNIT_WORD_PATTERN.sub("", text)
    text = text.replace("\\ ", "").replace("~", "")
    text = re.sub(r"\s+", "", text)
    text = _SHORTHAND_FRAC.sub(r"\\frac{\1}{\2}", text)
    text = _HALF_SHORTHAND_FRAC.sub(r"\\frac{\1}", text)
    text = _SHORTHAND_SQRT.sub(r"\\sqrt{\1}", text)
    text = text.strip("$").rstrip(".")
    if text.startswith("{") and text.endswith("}") and match_brace(text, 0) == len(text) - 1:
        text = text[1:-1]
    if _THOUSANDS_NUMBER.match(text):
        text = text.replace(",", "")
    text = _strip_numeric_zeros(text)
    return text


def _strip_numeric_zeros(text: str) -> str:
    """``10.0`` -> ``10``, ``+5`` -> ``5``, ``007`` -> ``7``: plain decimal numbers get one spelling."""
    if re.fullmatch(r"[+-]?\d+(?:\.\d+)?", text) is None:
        return text
    sign = "-" if text.startswith("-") else ""
    digits = text.lstrip("+-")
    if "." in digits:
        digits = digits.rstrip("0").rstrip(".")
    digits = digits.lstrip("0") or "0"
    if digits.startswith("."):
        digits = "0" + digits
    return "" + ("" if digits == "0" else sign) + digits


def strings_match(gold: str, prediction: str) -> bool:
    """Normalised string equality; empty answers never match."""
    normalized_gold = normalize_answer(gold)
    return bool(normalized_gold) and normalized_gold == normalize_answer(prediction)
