"""Repetition early truncation inside real vLLM generation (megatron_dispo.rollout.repetition_stop).

The looping checkpoint (models.tiny.make_cycling, period 8) makes greedy decoding cycle through 8 tokens forever; the
detector (algorithms.repetition) must stop it within check_every tokens of min_repeat_tokens, mark it `repetition`,
and keep the tokens generated before the stop (the forced stop token is dropped)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_dispo.algorithms.repetition import RepetitionConfig

pytestmark = pytest.mark.vllm
NUM_GPUS = 0
PERIOD = 8


def _periodic(ids: list[int], period: int) -> bool:
    return ids[period:] == ids[:-period]


def test_greedy_loop_is_truncated_with_reason_repetition(rollout_engines) -> None:
    engine = rollout_engines.get("loop")
    prompts = [[5, 6, 7], [900, 10]]
    detector = RepetitionConfig(min_repeats=4, min_repeat_tokens=32, check_every=8, confident_run=0)
    cut = engine.generate(prompts, n=1, temperature=0.0, max_new_tokens=96, repetition=detector)
    full = engine.generate(prompts, n=1, temperature=0.0, max_new_tokens=96, repetition=RepetitionConfig(enabled=False))
    assert full.finish_reason == ["length", "length"] and full.response_lengths == [96, 96]
    assert cut.finish_reason == ["repetition", "repetition"]
    for short, long in zip(cut.response_ids, full.response_ids, strict=True):
        assert _periodic(long, PERIOD) and not _periodic(long, PERIOD // 2)  # the model really loops, period 8
        # stopped at the first check (every 8 tokens) where the tail holds 4 periods and >= 32 tokens: 32 tokens
        assert len(short) == 32
        assert short == long[:32]  # greedy: the truncated response is the start of the untruncated one
    assert cut.stats["rollout/finish/repetition"] == 2 and cut.stats["rollout/repetition/ngram"] == 2
    assert cut.stats["rollout/repetition/forced_tokens_dropped"] == 2
    saved = sum(full.response_lengths) / sum(cut.response_lengths)
    assert saved == pytest.approx(96 / 32)


def test_detection_delay_is_bounded_by_check_every(rollout_engines) -> None:
    engine = rollout_engines.get("loop")
    detector = RepetitionConfig(min_repeats=3, min_repeat_tokens=20, check_every=16, confident_run=0)
    batch = engine.generate([[5, 6, 7]], n=3, temperature=0.0, max_new_tokens=150, repetition=detector)
    for ids in batch.response_ids:
        # evidence complete at 24 tokens (3 periods of 8 >= 20); checks at 16, 32, ... -> stopped at 32 <= 24 + 16
        assert len(ids) == 32 and _periodic(ids, PERIOD)
    assert batch.finish_reason == ["repetition"] * 3


def test_confident_run_rule_uses_sampling_probabilities(rollout_engines) -> None:
    engine = rollout_engines.get("loop")
    # n-gram rule out of reach (min_repeat_tokens > max_new_tokens): only the confident-run rule can fire
    detector = RepetitionConfig(min_repeat_tokens=10_000, confident_prob=0.9, confident_run=24, check_every=4)
    batch = engine.generate([[5, 6, 7]], n=4, temperature=1.0, max_new_tokens=120, repetition=detector, seed=7)
    assert batch.stats["rollout/repetition/confident_run"] == batch.stats["rollout/finish/repetition"] >= 1
    threshold = math.log(0.9)
    for ids, logprobs, reason in zip(batch.response_ids, batch.response_logprobs, batch.finish_reason, strict=True):
        runs = _runs(logprobs, threshold)  # independent check on the engine's returned (processed) log-probs
        checks = range(4, len(ids) + 1, 4)  # the processor checks every 4 generated tokens
        if reason == "repetition":
            # stopped at the first check where the trailing run of p > 0.9 tokens reached 24, not earlier or later
            assert len(ids) % 4 == 0 and runs[len(ids)] >= 24
            assert all(runs[check] < 24 for check in checks if check < len(ids))
        else:
            assert reason == "length" and all(runs[check] < 24 for check in checks)


def _runs(logprobs: list[float], threshold: float) -> list[int]:
    """runs[k] = length of the run of confident tokens ending at token k (k tokens generated)."""
    runs, run = [0], 0
    for logprob in logprobs:
        run = run + 1 if logprob > threshold else 0
        runs.append(run)
    return runs


def test_non_looping_sampling_is_not_truncated(rollout_engines, hf_logprobs, tiny_checkpoints) -> None:
    engine = rollout_engines.get("dense")
    batch = engine.generate([[5, 6, 7], [11, 12]], n=4, temperature=1.0, max_new_tokens=64, seed=3)
    assert "repetition" not in batch.finish_reason
    assert batch.stats["rollout/finish/repetition"] == 0
    first = batch.response_ids[0]
    reference = hf_logprobs(tiny_checkpoints["dense"], [5, 6, 7, *first], 3)
    assert torch.max(torch.abs(torch.tensor(batch.response_logprobs[0]) - reference)).item() <= 1e-4
