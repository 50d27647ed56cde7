"""Repetition detectors: exact tails on hand-built sequences, checked against a brute-force reference."""

from __future__ import annotations

import math
import random

import pytest
import torch

from megatron_dispo.algorithms import RepetitionConfig, RepetitionHit, detect_repetition, detect_repetition_batch
from megatron_dispo.algorithms.repetition import batch_repeated_ngram_rate, repeated_ngram_rate

NUM_GPUS = 0

SMALL = RepetitionConfig(max_period=8, min_repeats=3, min_repeat_tokens=6, confident_run=5)


def brute_force(tokens: list[int], config: RepetitionConfig) -> RepetitionHit | None:
    """Definition, written directly: smallest p whose required tail is p-periodic; longest p-periodic tail."""
    n = len(tokens)
    for period in range(1, config.max_period + 1):
        need = max(period * config.min_repeats, config.min_repeat_tokens)
        if need > n:
            continue
        if all(tokens[i] == tokens[i - period] for i in range(n - need + period, n)):
            start = n - need
            while start > 0 and tokens[start - 1] == tokens[start - 1 + period]:
                start -= 1
            return RepetitionHit("ngram", start, period, n - start)
    return None


def test_ngram_loop_reports_smallest_period_and_full_tail() -> None:
    tokens = [9, 8, 7, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2]  # period 3 from index 3: "1 2 3" x 3 + "1 2"
    assert detect_repetition(tokens, SMALL) == RepetitionHit(kind="ngram", start=3, period=3, length=11)
    # the tail "7 1 2 3 ..." does not extend: 7 != 3 (tokens[2] vs tokens[5])


def test_single_token_loop_and_min_tokens() -> None:
    assert detect_repetition([5, 4, 4, 4, 4, 4, 4], SMALL) == RepetitionHit("ngram", 1, 1, 6)
    assert detect_repetition([5, 4, 4, 4, 4, 4], SMALL) is None  # 5 repeats < min_repeat_tokens=6


def test_not_enough_repeats_is_not_a_loop() -> None:
    # period 4 needs 12 tokens; only 2.5 repeats of "1 2 3 4" at the end
    assert detect_repetition([7, 7, 6, 5, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2], SMALL) is None


def test_loop_that_stopped_is_not_reported() -> None:
    assert detect_repetition([1, 2] * 10 + [3], SMALL) is None  # the sequence no longer ends in the loop


def test_matches_brute_force_on_random_sequences() -> None:
    rng = random.Random(0)
    hits = 0
    for _ in range(400):
        prefix = [rng.randrange(5) for _ in range(rng.randrange(0, 30))]
        unit = [rng.randrange(5) for _ in range(rng.randrange(1, 9))]
        tail = (unit * rng.randrange(1, 6))[: rng.randrange(0, 40)]
        tokens = prefix + tail
        got = detect_repetition(tokens, SMALL)
        assert got == brute_force(tokens, SMALL), tokens
        hits += got is not None
    assert hits > 50  # the random cases exercise both outcomes


def test_confident_run() -> None:
    sure, unsure = math.log(0.995), math.log(0.5)
    tokens = list(range(12))  # no n-gram loop
    logprobs = [unsure] * 4 + [sure] * 8
    assert detect_repetition(tokens, SMALL, logprobs) == RepetitionHit("confident_run", 4, 1, 8)
    assert detect_repetition(tokens, SMALL, [unsure] * 8 + [sure] * 4) is None  # run 4 < 5
    at_threshold = [math.log(0.99)] * 12  # p > 0.99 is strict
    assert detect_repetition(tokens, SMALL, at_threshold) is None
    assert detect_repetition(tokens, SMALL, [sure] * 12) == RepetitionHit("confident_run", 0, 1, 12)
    disabled = RepetitionConfig(max_period=8, min_repeats=3, min_repeat_tokens=6, confident_run=0)
    assert detect_repetition(tokens, disabled, [sure] * 12) is None


def test_long_confident_run_extends_exactly() -> None:
    config = RepetitionConfig(confident_run=256)
    sure, unsure = math.log(0.999), math.log(0.3)
    logprobs = [sure] * 100 + [unsure] + [sure] * 3000
    hit = detect_repetition(list(range(len(logprobs))), config, logprobs)
    assert hit == RepetitionHit("confident_run", 101, 1, 3000)


def test_disabled_batch_and_validation() -> None:
    assert detect_repetition([1] * 100, RepetitionConfig(enabled=False)) is None
    hits = detect_repetition_batch([[1] * 40, list(range(40))], RepetitionConfig())
    assert hits == [RepetitionHit("ngram", 0, 1, 40), None]
    with pytest.raises(ValueError, match="logprobs has 2 entries but token_ids has 3"):
        detect_repetition([1, 2, 3], SMALL, [0.0, 0.0])
    with pytest.raises(ValueError, match="min_repeats=1 must be an int >= 2"):
        RepetitionConfig(min_repeats=1)
    with pytest.raises(ValueError, match=r"confident_prob=1.0 must be in \(0, 1\)"):
        RepetitionConfig(confident_prob=1.0)


def test_repeated_ngram_rate_counts_ngrams_seen_earlier_in_the_response() -> None:
    # trigrams of 1 2 3 1 2 3 1 2: 123 231 312 123 231 312 -> 3 of 6 seen before
    assert repeated_ngram_rate([1, 2, 3, 1, 2, 3, 1, 2], 3) == 0.5
    assert repeated_ngram_rate(list(range(10)), 2) == 0.0  # no phrase repeats
    assert repeated_ngram_rate([7] * 5, 1) == 0.8  # unigrams: 4 of 5 seen before
    assert repeated_ngram_rate([1, 2], 3) == 0.0  # shorter than n: no n-gram
    assert repeated_ngram_rate(torch.tensor([4, 4, 4]), 2) == 0.5  # tensors are read as lists
    # per-response mean over responses with an n-gram: ([1 1 1 1] -> 2/3, [1 2 3] -> 0; [1] has none) / 2
    assert batch_repeated_ngram_rate([[1, 1, 1, 1], [1], [1, 2, 3]], 2) == pytest.approx(1 / 3)
    assert batch_repeated_ngram_rate([[1]], 2) == 0.0
    with pytest.raises(ValueError, match="n=0 must be an int >= 1"):
        repeated_ngram_rate([1, 2], 0)
