"""DynamicSampler: fills the batch with mixed-correctness groups, bounded rounds, cached leftovers, resumable.

The groups come from a scripted sampler whose correctness pattern is a known function of the problem index, so
every count below is worked out by hand (the real vLLM + verifier path is exercised by the trainer tests).
"""

from __future__ import annotations

import json

import pytest

from megatron_dispo.data.problem import Problem
from megatron_dispo.trainer.rollout_phase import DynamicSampler, DynamicSamplingConfig, GroupRollout

G = 2
PATTERN = {0: [True, True], 1: [False, False], 2: [True, False]}  # index % 3: all correct, all wrong, mixed


def _p(index: int) -> Problem:
    return Problem(id=f"p{index}", problem=f"q{index}", answer=str(index), source="t")


class ProblemStream:
    def __init__(self) -> None:
        self.position = 0

    def __call__(self, n: int) -> list[Problem]:
        problems = [
            Problem(id=f"p{i}", problem=f"q{i}", answer=str(i), source="t")
            for i in range(self.position, self.position + n)
        ]
        self.position += n
        return problems


def scripted_groups(problems):
    groups = []
    for problem in problems:
        index = int(problem.id[1:])
        correct = PATTERN[index % 3]
        groups.append(
            GroupRollout(
                problem_id=problem.id,
                answer=problem.answer,
                prompt_ids=[1, index],
                response_ids=[[7], [8]],
                rollout_logprobs=[[-0.5], [-0.25]],
                finish_reasons=["stop", "stop"],
                correct=list(correct),
                outcomes=["correct" if c else "incorrect" for c in correct],
            )
        )
    return groups


def test_fills_with_mixed_groups_and_caches_leftovers():
    sampler = DynamicSampler(DynamicSamplingConfig(oversample_factor=1.0, max_rounds=10), G)
    stream = ProblemStream()
    batch, stats = sampler.collect(2, stream, scripted_groups)
    # round 1: p0,p1 -> none mixed; round 2: p2,p3 -> p2; round 3: p4 (1 missing) -> none; round 4: p5 -> p5
    assert [g.problem_id for g in batch] == ["p2", "p5"]
    assert stats.rounds == 4 and stats.sampled_groups == 6 and stats.kept_groups == 2
    assert stats.dropped_all_correct == 2 and stats.dropped_all_wrong == 2  # p0,p3 / p1,p4
    assert stats.metrics()["rollout/accuracy"] == pytest.approx(6 / 12)  # p0:2 p2:1 p3:2 p5:1 of 12
    assert sampler.cache == []


def test_oversampling_leftovers_are_used_first_next_step():
    sampler = DynamicSampler(DynamicSamplingConfig(oversample_factor=3.0, max_rounds=1), G)
    stream = ProblemStream()
    batch, _ = sampler.collect(1, stream, scripted_groups)  # samples p0..p2 -> p2
    assert [g.problem_id for g in batch] == ["p2"]
    batch, _ = sampler.collect(2, stream, scripted_groups)  # 6 prompts p3..p8 -> p5, p8
    assert [g.problem_id for g in batch] == ["p5", "p8"]
    sampler = DynamicSampler(DynamicSamplingConfig(oversample_factor=4.0, max_rounds=1), G)
    stream = ProblemStream()
    batch, _ = sampler.collect(1, stream, scripted_groups)  # p0..p3 -> p2 only
    batch, _ = sampler.collect(1, stream, scripted_groups)  # p4..p7 -> p5 (and nothing cached)
    assert [g.problem_id for g in batch] == ["p5"]
    batch, stats = sampler.collect(1, ProblemStream(), lambda ps: scripted_groups([_p(8), _p(11)]))
    assert [g.problem_id for g in batch] == ["p8"] and [g.problem_id for g in sampler.cache] == ["p11"]
    batch, stats = sampler.collect(1, ProblemStream(), scripted_groups)
    assert [g.problem_id for g in batch] == ["p11"] and stats.from_cache == 1 and stats.rounds == 0


def test_bounded_rounds_return_a_multiple_of_granularity_and_cache_the_rest():
    sampler = DynamicSampler(DynamicSamplingConfig(oversample_factor=1.0, max_rounds=2), G)
    # round 1: 4 prompts p0..p3 -> p2; round 2: 3 prompts p4..p6 -> p5 ; 2 groups < 4 wanted; granularity 2 -> 2
    batch, stats = sampler.collect(4, ProblemStream(), scripted_groups, granularity=2)
    assert [g.problem_id for g in batch] == ["p2", "p5"] and stats.rounds == 2
    sampler = DynamicSampler(DynamicSamplingConfig(oversample_factor=1.0, max_rounds=1), G)
    batch, _ = sampler.collect(
        3,
        ProblemStream(),
        lambda ps: scripted_groups([_p(i) for i in (2, 5, 8)]),
        granularity=2,
    )
    assert [g.problem_id for g in batch] == ["p2", "p5"] and [g.problem_id for g in sampler.cache] == ["p8"]


def test_disabled_uses_the_first_batch_unfiltered():
    sampler = DynamicSampler(DynamicSamplingConfig(enabled=False, oversample_factor=2.0), G)
    batch, stats = sampler.collect(3, ProblemStream(), scripted_groups)
    assert [g.problem_id for g in batch] == ["p0", "p1", "p2"] and stats.rounds == 1


def test_cache_survives_a_json_round_trip():
    sampler = DynamicSampler(DynamicSamplingConfig(oversample_factor=3.0, max_rounds=1), G)
    sampler.collect(1, lambda n: [_p(i) for i in (2, 5, 8)], scripted_groups)
    state = json.loads(json.dumps(sampler.state_dict()))
    restored = DynamicSampler(DynamicSamplingConfig(), G)
    restored.load_state_dict(state)
    assert restored.cache == sampler.cache and len(restored.cache) == 2


def test_config_validation():
    with pytest.raises(ValueError, match="group_size=1 must be >= 2"):
        DynamicSampler(DynamicSamplingConfig(), 1)
    with pytest.raises(ValueError, match=r"oversample_factor=0\.5 must be >= 1\.0"):
        DynamicSamplingConfig(oversample_factor=0.5)
