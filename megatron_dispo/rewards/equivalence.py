"""Is an extracted answer equivalent to the reference? math-verify first, normalised string match as fallback.

This is the expensive part of verification (sympy), so it runs inside the worker processes of
`megatron_dispo.rewards.pool`. It can also be called inline (the benchmark does, to measure pool overhead), but
only from the main thread: math-verify's own timeouts use ``signal.alarm``.
"""

from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from typing import Any, Literal

from math_verify import parse, verify
from math_verify.errors import TimeoutException

from megatron_dispo.rewards.normalize import strings_match

Verdict = Literal["correct", "incorrect", "timeout"]

# math-verify logs every swallowed parse failure and timeout at WARNING; we report timeouts as outcomes instead.
logging.getLogger("math_verify").setLevel(logging.ERROR)

_GOLD_CACHE_SIZE = 4096


_E_NOTATION = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)[eE]([+-]?\d+)(?![\w.])")
_TRAILING_UNITS = re.compile(
    r"(?<=[\d}.])\s*(?:\\(?:text|mathrm|mbox|textrm)\s*\{\s*~?\s*[A-Za-z][A-Za-z ]*\s*\}\s*)+$"
)


def prepare_latex(answer: str) -> str:
    """Rewrite what math-verify's LaTeX parser misreads: ``6.5e-7`` -> ``6.5\\times10^{-7}``; drop trailing units.

    Trailing ``\\text{ years}``-style units are removed only after a number or a closing brace, so a textual
    answer such as ``\\text{Evelyn}`` is kept.
    """
    prepared = _E_NOTATION.sub(r"\1\\times10^{\2}", answer.strip())
    return _TRAILING_UNITS.sub("", prepared).strip() or answer.strip()


def wrap_latex(answer: str) -> str:
    """Put a bare answer in ``\\boxed{}``: math-verify's parser finds nothing in LaTeX without ``$``/box anchors."""
    stripped = prepare_latex(answer)
    if "\\boxed" in stripped:
        return stripped
    return "\\boxed{" + stripped + "}"


def soft_timeout_seconds(timeout_s: float) -> int:
    """math-verify's own per-call alarm (whole seconds): a backstop one second past the parent's hard deadline.

    The parent kills the worker at `timeout_s`; the alarm only matters if the module is used inline.
    """
    return max(1, math.ceil(timeout_s) + 1)


class GoldCache:
    """LRU cache of parsed reference answers: a group of G responses shares one gold, so parse it once."""

    def __init__(self, max_size: int = _GOLD_CACHE_SIZE) -> None:
        self._parsed: OrderedDict[str, list[Any]] = OrderedDict()
        self._max_size = max_size

    def get(self, gold: str, soft_timeout: int) -> list[Any]:
        if gold in self._parsed:
            self._parsed.move_to_end(gold)
            return self._parsed[gold]
        parsed = parse_latex_answer(gold, soft_timeout)
        self._parsed[gold] = parsed
        if len(self._parsed) > self._max_size:
            self._parsed.popitem(last=False)
        return parsed


def parse_latex_answer(answer: str, soft_timeout: int) -> list[Any]:
    """math-verify parse of one answer; raises TimeoutException when its alarm fires, [] when nothing parses."""
    try:
        return parse(wrap_latex(answer), parsing_timeout=soft_timeout, raise_on_error=True)
    except TimeoutException:
        raise
    except Exception:  # unparsable LaTeX is an ordinary wrong/odd answer, not an error of the verifier
        return []


def check_equivalence(gold: str, prediction: str, *, timeout_s: float, gold_cache: GoldCache) -> Verdict:
    """Verdict for one (reference, extracted answer) pair.

    Order: normalised string equality (cheap and catches units/``\\text{}`` differences), then math-verify's
    symbolic/numeric/set/interval/matrix comparison over every parsed form of both answers.
    """
    if strings_match(gold, prediction):
        return "correct"
    soft_timeout = soft_timeout_seconds(timeout_s)
    try:
        gold_parsed = gold_cache.get(gold, soft_timeout)
        prediction_parsed = parse_latex_answer(prediction, soft_timeout)
        if not gold_parsed or not prediction_parsed:
            return "incorrect"
        for gold_form in gold_parsed:
            for prediction_form in prediction_parsed:
                if _verify_pair(gold_form, prediction_form, soft_timeout):
                    return "correct"
    except TimeoutException:
        return "timeout"
    return "incorrect"


def _verify_pair(gold_form: Any, prediction_form: Any, soft_timeout: int) -> bool:
    """One math-verify comparison; its timeout propagates (reported as `timeout`, never as a silent wrong)."""
    try:
        return bool(
            verify(
                gold_form,
                prediction_form,
                timeout_seconds=soft_timeout,
                raise_on_error=True,
                allow_set_relation_comp=True,
            )
        )
    except TimeoutException:
        raise
    except Exception:  # incomparable forms (e.g. a set against a string) simply do not match
        return False
