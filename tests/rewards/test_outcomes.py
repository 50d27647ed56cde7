"""Outcome shares (rollout/verify/*), the reward: config section and the verifier-failure policy."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest

from megatron_dispo.config import load_run_config
from megatron_dispo.config_loader import ConfigError
from megatron_dispo.rewards import (
    OUTCOMES,
    VERIFIER_FAILURES,
    Outcome,
    OutcomeCounts,
    RewardConfig,
    VerifyResult,
    outcome_fractions,
    screen_verifier_failures,
)

TINY_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_cpu_dispo.yaml"


def _results(*outcomes: str) -> list[VerifyResult]:
    return [VerifyResult(1.0 if o == "correct" else -1.0, o, None if o == "no_answer" else "1") for o in outcomes]  # type: ignore[arg-type]


def test_one_outcome_vocabulary() -> None:
    assert OUTCOMES == get_args(Outcome) == ("correct", "incorrect", "no_answer", "timeout", "error")
    assert set(VERIFIER_FAILURES) == {"timeout", "error"}


def test_outcome_fractions_of_a_batch() -> None:
    results = _results("correct", "correct", "correct", "incorrect", "no_answer", "timeout", "error", "error")
    assert outcome_fractions(results) == {
        "rollout/verify/correct": 3 / 8,
        "rollout/verify/incorrect": 1 / 8,
        "rollout/verify/no_answer": 1 / 8,
        "rollout/verify/timeout": 1 / 8,
        "rollout/verify/error": 2 / 8,
    }


def test_outcome_fractions_of_counts_summed_over_rounds_and_of_an_empty_batch() -> None:
    rounds = OutcomeCounts.from_results(_results("correct", "timeout")) + OutcomeCounts.from_results(
        _results("incorrect", "incorrect")
    )
    assert outcome_fractions(rounds, prefix="eval/verify/") == {
        "eval/verify/correct": 0.25,
        "eval/verify/incorrect": 0.5,
        "eval/verify/no_answer": 0.0,
        "eval/verify/timeout": 0.25,
        "eval/verify/error": 0.0,
    }
    assert set(outcome_fractions([]).values()) == {0.0}


def test_count_as_wrong_keeps_every_response_and_warns_above_the_threshold() -> None:
    outcomes = ["correct"] * 7 + ["incorrect"] * 10 + ["timeout", "error", "repetition"]  # 2 failures of 20
    screen = screen_verifier_failures(outcomes, RewardConfig(failure_warn_fraction=0.05))
    assert screen.valid == (True,) * 20
    assert (screen.num_failures, screen.failure_fraction) == (2, 0.1)
    assert screen.warning is not None
    for part in ("2 of 20 responses (10.0%: 1 timeout, 1 error)", "failure_warn_fraction=0.05", "counted as wrong"):
        assert part in screen.warning
    assert "raise reward.verify_timeout_s (now 5.0 s)" in screen.warning and "data.answer_format" in screen.warning


def test_drop_marks_only_verifier_failures_invalid() -> None:
    outcomes = ["correct", "timeout", "no_answer", "error", "incorrect", "repetition"]
    screen = screen_verifier_failures(outcomes, RewardConfig(on_verifier_failure="drop", failure_warn_fraction=0.5))
    assert screen.valid == (True, False, True, False, True, True)
    assert screen.warning is None  # 2 of 6 = 33% is not above 50%
    warned = screen_verifier_failures(outcomes, RewardConfig(on_verifier_failure="drop", failure_warn_fraction=0.3))
    assert warned.warning is not None and "dropped from their groups" in warned.warning


def test_threshold_is_exclusive_and_one_never_warns() -> None:
    assert screen_verifier_failures(["timeout", "correct"], RewardConfig(failure_warn_fraction=0.5)).warning is None
    assert screen_verifier_failures(["timeout"] * 3, RewardConfig(failure_warn_fraction=1.0)).warning is None
    assert screen_verifier_failures(["error"], RewardConfig(failure_warn_fraction=0.0)).warning is not None
    empty = screen_verifier_failures([], RewardConfig(failure_warn_fraction=0.0))
    assert (empty.valid, empty.failure_fraction, empty.warning) == ((), 0.0, None)


def test_screen_rejects_results_instead_of_outcome_names() -> None:
    with pytest.raises(TypeError, match="sequence of outcome names"):
        screen_verifier_failures(_results("correct"), RewardConfig())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sequence of outcome names"):
        screen_verifier_failures("timeout", RewardConfig())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"verify_timeout_s": 0}, r"verify_timeout_s=0 must be a positive finite number of seconds; the paper uses 5"),
        ({"verify_timeout_s": float("inf")}, "verify_timeout_s=inf must be a positive finite"),
        ({"on_verifier_failure": "skip"}, r"on_verifier_failure='skip' is not a policy; use one of \['count_as_wrong'"),
        ({"failure_warn_fraction": 1.5}, r"failure_warn_fraction=1.5 must be a fraction in \[0, 1\]"),
        ({"failure_warn_fraction": -0.1}, r"failure_warn_fraction=-0.1 must be a fraction in \[0, 1\]"),
    ],
)
def test_reward_config_errors_name_field_value_and_fix(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RewardConfig(**kwargs)  # type: ignore[arg-type]


def test_reward_section_of_the_run_config() -> None:
    default = load_run_config(TINY_CONFIG)
    assert default.reward == RewardConfig()
    config = load_run_config(
        TINY_CONFIG,
        ["reward.on_verifier_failure=drop", "reward.verify_timeout_s=10", "reward.failure_warn_fraction=0.2"],
    )
    assert config.reward == RewardConfig(verify_timeout_s=10.0, on_verifier_failure="drop", failure_warn_fraction=0.2)
    with pytest.raises(ConfigError, match=r"reward\.on_verifier_failure"):
        load_run_config(TINY_CONFIG, ["reward.on_verifier_failure=skip"])
