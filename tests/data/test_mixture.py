"""Training mixture: weights, deterministic order by seed, exact resumption from state_dict."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from megatron_dispo.data import MixtureSource, Problem, ProblemMixture


def _source(name: str, size: int, weight: float) -> MixtureSource:
    problems = [Problem(id=f"{name}-{i}", problem=f"p{i}", answer=str(i), source=name) for i in range(size)]
    return MixtureSource(name, problems, weight)


def _mixture(seed: int = 0) -> ProblemMixture:
    return ProblemMixture([_source("a", 10, 3.0), _source("b", 7, 1.0)], seed=seed)


def test_weights_set_the_source_frequencies() -> None:
    counts = Counter(problem.source for problem in _mixture().take(8000))
    assert counts["a"] / 8000 == pytest.approx(0.75, abs=0.02)  # 3 / (3 + 1)


def test_each_epoch_visits_every_problem_once() -> None:
    mixture = ProblemMixture([_source("a", 10, 1.0)], seed=5)
    first, second = mixture.take(10), mixture.take(10)
    assert sorted(p.id for p in first) == sorted(f"a-{i}" for i in range(10))
    assert sorted(p.id for p in second) == sorted(f"a-{i}" for i in range(10))
    assert [p.id for p in first] != [p.id for p in second]  # reshuffled per epoch


def test_deterministic_by_seed() -> None:
    assert [p.id for p in _mixture(1).take(50)] == [p.id for p in _mixture(1).take(50)]
    assert [p.id for p in _mixture(1).take(50)] != [p.id for p in _mixture(2).take(50)]


def test_resume_from_state_dict_continues_exactly() -> None:
    continuous = [p.id for p in _mixture().take(60)]
    first = _mixture()
    head = [p.id for p in first.take(23)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip (checkpoints)
    resumed = _mixture()
    resumed.load_state_dict(state)
    assert head + [p.id for p in resumed.take(37)] == continuous


def test_state_from_other_sources_or_seed_is_rejected() -> None:
    state = _mixture(0).state_dict()
    with pytest.raises(ValueError, match="same seed"):
        _mixture(1).load_state_dict(state)
    other = ProblemMixture([_source("a", 11, 3.0), _source("b", 7, 1.0)], seed=0)
    with pytest.raises(ValueError, match="same sources"):
        other.load_state_dict(state)


def test_invalid_sources() -> None:
    with pytest.raises(ValueError, match="weight=0"):
        _source("a", 3, 0.0)
    with pytest.raises(ValueError, match="has no problems"):
        MixtureSource("empty", [], 1.0)
    with pytest.raises(ValueError, match="unique"):
        ProblemMixture([_source("a", 3, 1.0), _source("a", 4, 1.0)])
