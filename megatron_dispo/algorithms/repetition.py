"""Degenerate-generation detectors on plain token ids: "is the sequence, as it ends now, looping?"

Two signals (DISPO Sec. 4: over-tight clipping of regime 3 collapses into repetitive outputs):
  * n-gram loop: the smallest period p <= max_period such that the last max(p * min_repeats, min_repeat_tokens)
    tokens are p-periodic (x[i] == x[i - p]); the hit reports the whole periodic tail.
  * confident run: the last `confident_run` tokens all had probability > confident_prob (log-probs needed).
When both fire, the n-gram hit is returned (it carries the period). `repeated_ngram_rate` measures instead how much
of a whole response repeats itself (the Regime 3 guard's signal in `regime_control.py`).

Speed: every comparison is a list-slice equality or a `min` over a slice, i.e. runs in C; a call on a 4k-token
sequence costs tens of microseconds (benchmarks/bench_losses.py), so the rollout engine can call it every
`check_every` decode steps per sequence without incremental state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class RepetitionConfig:
    """When a generation counts as degenerate."""

    enabled: bool = True
    """False: detect_repetition always returns None."""
    max_period: int = 64
    """Longest n-gram period searched."""
    min_repeats: int = 4
    """The period must repeat this many times back-to-back at the end."""
    min_repeat_tokens: int = 32
    """... and the repeated tail must cover at least this many tokens."""
    confident_prob: float = 0.99
    """Near-certain token threshold (probability, strict >)."""
    confident_run: int = 256
    """Run length of near-certain tokens that counts as degenerate (0 disables)."""
    check_every: int = 8
    """Callers may run the check every k decode steps (not used by the detector itself)."""

    def __post_init__(self) -> None:
        for name, minimum in (("max_period", 1), ("min_repeats", 2), ("min_repeat_tokens", 1), ("check_every", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name}={value!r} must be an int >= {minimum}.")
        if isinstance(self.confident_run, bool) or not isinstance(self.confident_run, int) or self.confident_run < 0:
            raise ValueError(f"confident_run={self.confident_run!r} must be an int >= 0 (0 disables the run check).")
        if isinstance(self.confident_prob, bool) or not isinstance(self.confident_prob, int | float):
            raise ValueError(f"confident_prob={self.confident_prob!r} must be a probability in (0, 1).")
        if not 0.0 < self.confident_prob < 1.0:
            raise ValueError(f"confident_prob={self.confident_prob} must be in (0, 1), e.g. 0.99.")
        if not isinstance(self.enabled, bool):
            raise ValueError(f"enabled={self.enabled!r} must be a bool.")


@dataclass(frozen=True)
class RepetitionHit:
    """A detected degenerate tail."""

    kind: Literal["ngram", "confident_run"]
    start: int
    """Index in the token list where the repetitive tail starts."""
    period: int
    """n-gram period (1 for confident_run)."""
    length: int
    """Number of tokens in the repetitive tail (len(token_ids) - start)."""


def detect_repetition(
    token_ids: Sequence[int], config: RepetitionConfig, logprobs: Sequence[float] | None = None
) -> RepetitionHit | None:
    """The degenerate tail of `token_ids` as it ends now, or None.

    Args:
        token_ids: the response so far (list/tuple of ints; other sequences are converted).
        config: thresholds.
        logprobs: optional log-prob of each sampled token (same length) for the confident-run check.
    """
    if not config.enabled:
        return None
    tokens = token_ids if isinstance(token_ids, list | tuple) else _to_list(token_ids, "token_ids")
    if logprobs is not None:
        logprobs = logprobs if isinstance(logprobs, list | tuple) else _to_list(logprobs, "logprobs")
        if len(logprobs) != len(tokens):
            raise ValueError(
                f"logprobs has {len(logprobs)} entries but token_ids has {len(tokens)}; pass one log-prob per token."
            )
    hit = _ngram_tail(tokens, config)
    if hit is None and logprobs is not None and config.confident_run > 0:
        hit = _confident_tail(logprobs, config)
    return hit


def detect_repetition_batch(
    responses: Sequence[Sequence[int]],
    config: RepetitionConfig,
    logprobs: Sequence[Sequence[float] | None] | None = None,
) -> list[RepetitionHit | None]:
    """`detect_repetition` for each finished response (post-hoc counting, e.g. the share of looping answers)."""
    if logprobs is not None and len(logprobs) != len(responses):
        raise ValueError(
            f"logprobs has {len(logprobs)} entries but responses has {len(responses)}; pass one per response."
        )
    return [
        detect_repetition(tokens, config, None if logprobs is None else logprobs[i])
        for i, tokens in enumerate(responses)
    ]


def repeated_ngram_rate(token_ids: Sequence[int], n: int) -> float:
    """Share of the n-grams of one response that already occurred earlier in it: 1 - distinct / total.

    0 for a response that never repeats a phrase of n tokens, close to 1 for one that loops. It is one of the Regime 3
    guard's repetition signals (DISPO Sec. 4: too tight an eps_high_neg collapses into repetitive outputs); unlike
    `detect_repetition` it also sees loops that the response later left. A response of fewer than n tokens has no
    n-gram and rate 0. Counting distinct n-grams with `zip` over shifted slices runs in C (no Python loop per token).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be an int >= 1 (the n-gram length in tokens), e.g. 8.")
    tokens = token_ids if isinstance(token_ids, list | tuple) else _to_list(token_ids, "token_ids")
    total = len(tokens) - n + 1
    if total <= 0:
        return 0.0
    distinct = len(set(zip(*(tokens[k : k + total] for k in range(n)), strict=True)))
    return 1.0 - distinct / total


def batch_repeated_ngram_rate(responses: Sequence[Sequence[int]], n: int) -> float:
    """Mean `repeated_ngram_rate` over the responses that have at least one n-gram (0.0 when none has)."""
    rates = [repeated_ngram_rate(tokens, n) for tokens in responses if len(tokens) >= n]
    return math.fsum(rates) / len(rates) if rates else 0.0


def _to_list(values: object, name: str) -> list:
    if hasattr(values, "tolist"):
        values = values.tolist()
    try:
        return list(values)
    except TypeError as error:
        raise TypeError(f"{name} must be a sequence, got {type(values).__name__}.") from error


def _ngram_tail(tokens: Sequence[int], config: RepetitionConfig) -> RepetitionHit | None:
    n = len(tokens)
    last = n - 1
    for period in range(1, min(config.max_period, n // config.min_repeats) + 1):
        need = max(period * config.min_repeats, config.min_repeat_tokens)
        if need > n or tokens[last] != tokens[last - period]:
            continue
        # the tail of length `need` is p-periodic iff it equals itself shifted by p
        if tokens[n - need : n - period] != tokens[n - need + period : n]:
            continue
        length = _periodic_extent(tokens, period, need)
        return RepetitionHit(kind="ngram", start=n - length, period=period, length=length)
    return None


def _periodic_extent(tokens: Sequence[int], period: int, known: int) -> int:
    """Longest p-periodic tail, given one of length `known`: galloping then binary search on slice equality
    (periodicity of a tail is monotone in its length)."""
    n = len(tokens)

    def periodic(length: int) -> bool:
        return tokens[n - length : n - period] == tokens[n - length + period : n]

    good, step = known, known
    while good < n:
        trial = min(n, good + step)
        if not periodic(trial):
            bad = trial
            break
        good, step = trial, step * 2
    else:
        return n
    while bad - good > 1:
        middle = (good + bad) // 2
        if periodic(middle):
            good = middle
        else:
            bad = middle
    return good


def _confident_tail(logprobs: Sequence[float], config: RepetitionConfig) -> RepetitionHit | None:
    n = len(logprobs)
    run = config.confident_run
    if n < run:
        return None
    threshold = math.log(config.confident_prob)
    if not min(logprobs[n - run :]) > threshold:
        return None
    # extend backwards in doubling chunks (min over a slice runs in C), then binary-search inside the failing chunk
    start, step = n - run, run
    while start > 0:
        chunk_start = max(0, start - step)
        if min(logprobs[chunk_start:start]) > threshold:
            start, step = chunk_start, step * 2
            continue
        failing, confident = chunk_start, start  # [failing:start] has a non-confident token, [confident:start] none
        while confident - failing > 1:
            middle = (failing + confident) // 2
            if min(logprobs[middle:start]) > threshold:
                confident = middle
            else:
                failing = middle
        start = confident
        break
    return RepetitionHit(kind="confident_run", start=start, period=1, length=n - start)
