"""CPU tests for `RegimeController` (adaptive DISPO, issue 25) on synthetic signal sequences.

Every expected trajectory is written out by hand (steps and limits are powers of two, so the products are exact):
entropy-band crossing with patience and the inner release band, calibration, the limits, each guard firing and
releasing, a state_dict round trip that continues exactly, and the one-line config errors.
"""

from __future__ import annotations

import json

import pytest

from megatron_dispo.algorithms.presets import get_preset
from megatron_dispo.algorithms.regime_control import (
    ClipBounds,
    Regime3GuardConfig,
    Regime4GuardConfig,
    RegimeControlConfig,
    RegimeController,
    StepSignals,
    apply_bounds,
    check_regime_control,
)
from megatron_dispo.config import AlgorithmConfig
from megatron_dispo.config_loader import ConfigError, load_config

NUM_GPUS = 0

BAND = {
    "mode": "entropy_band",
    "band_reference": "absolute",
    "band_low": 1.0,
    "band_high": 2.0,  # inner release band [1.25, 1.75] with release_fraction 0.25
    "patience": 2,
    "release_fraction": 0.25,
    "eps_high_pos_limits": (0.25, 8.0),
    "eps_high_pos_step": 2.0,
    "eps_high_pos_widen_from": 0.25,
    "eps_low_pos_limits": (0.0625, 1.0),
    "eps_low_pos_step": 2.0,
    "eps_low_pos_widen_from": 0.0625,
}


def run(controller: RegimeController, signals: list[StepSignals]) -> list[ClipBounds]:
    """Observe each step's signals; return the bounds set for the step after each."""
    trajectory = []
    for step_signals in signals:
        controller.observe(step_signals)
        trajectory.append(controller.bounds())
    return trajectory


def test_entropy_band_crossing_patience_release_band_and_limits() -> None:
    controller = RegimeController(RegimeControlConfig(**BAND), get_preset("dispo", eps_high_pos=4.0, eps_low_pos=0.25))
    entropies = [2.5, 2.5, 1.9, 1.7, 1.9, 0.5, 0.5, 0.9, 1.1, 1.2, 1.0, 1.3]
    trajectory = run(controller, [StepSignals(entropy=e) for e in entropies])
    expected_positive = [
        (4.0, 0.25),  # above the band once: patience 2 not reached
        (2.0, 0.5),  # above twice: lower entropy (narrow Regime 1, widen Regime 2)
        (1.0, 1.0),  # 1.9 is back in the band but above the inner band (1.75): keep correcting
        (1.0, 1.0),  # 1.7 <= 1.75: released, no move
        (1.0, 1.0),  # inside the band
        (1.0, 1.0),  # below once
        (2.0, 0.5),  # below twice: raise entropy (widen Regime 1, narrow Regime 2)
        (4.0, 0.25),
        (8.0, 0.125),  # 1.1 is in the band but under the inner band (1.25): keep correcting
        (8.0, 0.0625),  # eps_high_pos at its maximum 8
        (8.0, 0.0625),  # eps_low_pos at its minimum 0.0625 too
        (8.0, 0.0625),  # 1.3 >= 1.25: released
    ]
    assert [(b.eps_high_pos, b.eps_low_pos) for b in trajectory] == expected_positive
    assert all((b.eps_high_neg, b.eps_low_neg) == (100.0, 1.0) for b in trajectory)  # guards off: untouched


def test_entropy_direction_metric_and_patience_reset_by_an_inside_step() -> None:
    controller = RegimeController(RegimeControlConfig(**BAND), get_preset("dispo", eps_high_pos=4.0, eps_low_pos=0.25))
    directions = []
    for entropy in [2.5, 1.5, 2.5, 2.5, 1.0]:  # the inside step resets the count: the move comes at the 4th step
        controller.observe(StepSignals(entropy=entropy))
        directions.append(controller.metrics()["control/entropy_direction"])
    assert directions == [0.0, 0.0, 0.0, 1.0, 0.0]  # 1.0 is below the inner band's top: released
    assert controller.bounds().eps_high_pos == 2.0


def test_calibrated_band_waits_for_its_reference_then_moves() -> None:
    calibrated = {"band_reference": "calibrated", "band_low": 0.5, "band_high": 1.5, "calibration_steps": 2}
    config = RegimeControlConfig(**{**BAND, **calibrated, "patience": 1})
    controller = RegimeController(config, get_preset("dispo", eps_high_pos=4.0, eps_low_pos=0.25))
    controller.observe(StepSignals(entropy=1.0))
    metrics = controller.metrics()
    assert metrics["control/calibrating"] == 1.0 and "control/band_low" not in metrics
    controller.observe(StepSignals(entropy=3.0))  # reference (1 + 3) / 2 = 2 -> band [1, 3]; no move yet
    metrics = controller.metrics()
    assert (metrics["control/band_low"], metrics["control/band_high"], metrics["control/calibrating"]) == (1, 3, 0)
    assert controller.bounds().eps_high_pos == 4.0
    controller.observe(StepSignals(entropy=3.5))  # above [1, 3] with patience 1: lower entropy
    assert (controller.bounds().eps_high_pos, controller.bounds().eps_low_pos) == (2.0, 0.5)


def test_regime3_guard_fires_widens_from_zero_releases_and_holds() -> None:
    guard = Regime3GuardConfig(
        enabled=True, threshold=0.1, release_threshold=0.02, patience=2,
        eps_high_neg_limits=(0.0, 100.0), eps_high_neg_step=4.0, eps_high_neg_widen_from=1.0,
    )  # fmt: skip
    controller = RegimeController(RegimeControlConfig(regime3_guard=guard), get_preset("dispo_no_regime3"))
    shares = [0.2, 0.05, 0.2, 0.3, 0.3, 0.01, 0.01, 0.2, 0.2, 0.2, 0.2]
    states, bounds = [], []
    for share in shares:
        controller.observe(StepSignals(repetition_truncated_share=share))
        states.append(controller.metrics()["control/regime3_guard"])
        bounds.append(controller.bounds().eps_high_neg)
    # 0.05 sits between the thresholds and resets the count; the guard fires on the 2nd step in a row above 0.1
    assert states == [0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1]
    assert bounds == [0.0, 0.0, 0.0, 1.0, 4.0, 16.0, 16.0, 16.0, 64.0, 100.0, 100.0]
    assert controller.metrics()["control/repetition"] == 0.2
    assert controller.bounds()[:2] == (10.0, 0.2)  # mode off: the positive bounds never move


def test_regime3_guard_reads_the_configured_ngram_signal() -> None:
    guard = Regime3GuardConfig(enabled=True, signal="repeated_ngram_rate", patience=1)
    controller = RegimeController(RegimeControlConfig(regime3_guard=guard), get_preset("dispo", eps_high_neg=2.0))
    controller.observe(StepSignals(repetition_truncated_share=0.9, repeated_ngram_rate=0.0))
    assert controller.bounds().eps_high_neg == 2.0
    controller.observe(StepSignals(repetition_truncated_share=0.0, repeated_ngram_rate=0.5))
    assert controller.bounds().eps_high_neg == 8.0
    with pytest.raises(ValueError, match=r"StepSignals.repeated_ngram_rate is None but regime3_guard"):
        controller.observe(StepSignals(repetition_truncated_share=0.5))


def test_regime4_guard_fires_on_a_length_fall_over_its_window_and_releases() -> None:
    guard = Regime4GuardConfig(
        enabled=True, window=2, fall_fraction=0.2, release_fall_fraction=0.05, patience=1,
        eps_low_neg_limits=(0.0, 1.0), eps_low_neg_step=2.0, eps_low_neg_widen_from=0.125,
    )  # fmt: skip
    controller = RegimeController(RegimeControlConfig(regime4_guard=guard), get_preset("dispo_no_regime4"))
    lengths = [100.0, 100.0, 70.0, 50.0, 50.0, 50.0, 60.0, 40.0, 40.0, 40.0, 40.0]
    drops, states, bounds = [], [], []
    for length in lengths:
        controller.observe(StepSignals(response_length_mean=length))
        metrics = controller.metrics()
        drops.append(round(metrics["control/length_drop"], 6) if "control/length_drop" in metrics else None)
        states.append(metrics["control/regime4_guard"])
        bounds.append(controller.bounds().eps_low_neg)
    # drop_t = 1 - L_t / L_{t-2}
    assert drops == [None, None, 0.3, 0.5, round(1 - 50 / 70, 6), 0.0, -0.2, 0.2, round(1 / 3, 6), 0.0, 0.0]
    assert states == [0, 0, 1, 1, 1, 0, 0, 0, 1, 0, 0]  # 0.2 is not above fall_fraction 0.2
    assert bounds == [0.0, 0.0, 0.125, 0.25, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0]  # at most 1 (weight >= 0)


STEPS = [
    StepSignals(entropy=e, response_length_mean=length, repetition_truncated_share=share)
    for e, length, share in [
        (1.0, 100.0, 0.0), (1.2, 90.0, 0.2), (2.6, 80.0, 0.3), (2.7, 60.0, 0.3), (2.2, 55.0, 0.0),
        (1.9, 55.0, 0.0), (0.6, 54.0, 0.2), (0.7, 40.0, 0.2), (1.1, 38.0, 0.0), (1.4, 38.0, 0.0),
    ]
]  # fmt: skip
ALL_ON = RegimeControlConfig(
    **{**BAND, "band_reference": "calibrated", "band_low": 0.8, "band_high": 1.25, "calibration_steps": 2},
    regime3_guard=Regime3GuardConfig(enabled=True, threshold=0.1, patience=1),
    regime4_guard=Regime4GuardConfig(enabled=True, window=2, patience=1),
)


@pytest.mark.parametrize("cut", [1, 4, 7])
def test_state_dict_round_trip_through_json_continues_exactly(cut: int) -> None:
    loss = get_preset("dispo", eps_high_pos=4.0, eps_low_pos=0.25, eps_high_neg=0.0, eps_low_neg=0.0)
    uninterrupted = RegimeController(ALL_ON, loss)
    reference = []
    for step_signals in STEPS:
        uninterrupted.observe(step_signals)
        reference.append(json.dumps([uninterrupted.bounds(), uninterrupted.metrics()]))
    assert len(set(reference)) > 5  # the sequence moves all four bounds: the comparison is not vacuous

    first = RegimeController(ALL_ON, loss)
    for step_signals in STEPS[:cut]:
        first.observe(step_signals)
    resumed = RegimeController(ALL_ON, loss)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert json.dumps([resumed.bounds(), resumed.metrics()]) == reference[cut - 1]
    for index, step_signals in enumerate(STEPS[cut:], start=cut):
        resumed.observe(step_signals)
        assert json.dumps([resumed.bounds(), resumed.metrics()]) == reference[index], f"step {index}"


def test_load_state_dict_rejects_other_formats_and_bounds_outside_this_runs_limits() -> None:
    controller = RegimeController(ALL_ON, get_preset("dispo", eps_high_pos=4.0, eps_low_pos=0.25))
    state = controller.state_dict()
    with pytest.raises(ValueError, match="format 0, this code reads 1"):
        controller.load_state_dict({**state, "format": 0})
    with pytest.raises(ValueError, match=r"lacks \['recent_lengths'\]"):
        controller.load_state_dict({k: v for k, v in state.items() if k != "recent_lengths"})
    with pytest.raises(ValueError, match=r"eps_high_pos_limits=\(0.25, 8.0\) excludes the checkpointed value"):
        controller.load_state_dict({**state, "bounds": {**state["bounds"], "eps_high_pos": 10.0}})


def test_metrics_keys_and_apply_bounds() -> None:
    loss = get_preset("dispo", eps_high_pos=8.0, eps_low_pos=0.25)
    controller = RegimeController(RegimeControlConfig(**BAND), loss)
    always = {
        "control/eps_high_pos", "control/eps_low_pos", "control/eps_high_neg", "control/eps_low_neg",
        "control/band_low", "control/band_high", "control/calibrating", "control/entropy_direction",
        "control/regime3_guard", "control/regime4_guard",
    }  # fmt: skip
    assert set(controller.metrics()) == always  # nothing observed yet: no signal is reported (never NaN)
    measured = RegimeController(RegimeControlConfig(**BAND), loss)
    measured.observe(StepSignals(entropy=1.0, response_length_mean=12.0))
    assert set(measured.metrics()) == always | {"control/entropy"}
    controller.observe(StepSignals(entropy=3.0))
    controller.observe(StepSignals(entropy=3.0))
    metrics = controller.metrics()
    assert (metrics["control/eps_high_pos"], metrics["control/band_high"]) == (8.0, 2.0)  # step 2 trained with 8
    moved = apply_bounds(loss, controller.bounds())
    assert (moved.eps_high_pos, moved.eps_low_pos, moved.eps_high_neg, moved.eps_low_neg) == (4.0, 0.5, 100.0, 1.0)
    assert moved.loss_type == "dispo" and moved.condition_on == loss.condition_on


def test_controller_with_everything_off_is_inactive() -> None:
    config = RegimeControlConfig()
    assert not config.active and config.moved_bounds() == ()
    assert RegimeControlConfig(regime4_guard=Regime4GuardConfig(enabled=True)).active


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"band_low": 2.0, "band_high": 1.0}, r"band_low \(2.0\) must be < band_high \(1.0\).*swap them"),
        ({"mode": "pid"}, r"mode='pid' is not a valid choice; use one of \['off', 'entropy_band'\]"),
        ({"band_low": 0.0}, "band_low=0.0 must be > 0 with band_reference=calibrated"),
        ({"eps_high_pos_step": 1.0}, "eps_high_pos_step=1.0 must be > 1: each move multiplies or divides"),
        ({"eps_low_pos_step": 0.5}, "eps_low_pos_step=0.5 must be > 1"),
        ({"eps_high_pos_limits": (5.0, 1.0)}, r"eps_high_pos_limits=\(5.0, 1.0\) is upside down.*swap them"),
        ({"eps_low_pos_limits": (0.1, 2.0)}, r"eps_low_pos_limits=\(0.1, 2.0\) exceeds 1.0"),
        ({"eps_low_pos_widen_from": 0.0}, "eps_low_pos_widen_from=0.0 must be a finite number > 0"),
        ({"release_fraction": 0.5}, r"release_fraction=0.5 must be in \[0, 0.5\)"),
        ({"calibration_steps": 0}, "calibration_steps=0 must be an int >= 1"),
    ],
)
def test_config_errors_name_the_field_and_the_fix(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RegimeControlConfig(**fields)


@pytest.mark.parametrize(
    ("guard", "fields", "message"),
    [
        (Regime3GuardConfig, {"threshold": 0.05, "release_threshold": 0.1}, r"release_threshold \(0.1\) must be <="),
        (Regime3GuardConfig, {"eps_high_neg_step": 1.0}, "regime3_guard.eps_high_neg_step=1.0 must be > 1"),
        (Regime4GuardConfig, {"release_fall_fraction": 0.3}, r"release_fall_fraction=0.3 must be in \[0, fall_"),
        (Regime4GuardConfig, {"eps_low_neg_limits": (0.5, 0.1)}, r"eps_low_neg_limits=\(0.5, 0.1\) is upside down"),
        (Regime4GuardConfig, {"window": 0}, "regime4_guard.window=0 must be an int >= 1"),
    ],
)
def test_guard_config_errors(guard: type, fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        guard(**fields)


@pytest.mark.parametrize(
    ("config", "loss", "message"),
    [
        (
            RegimeControlConfig(regime3_guard=Regime3GuardConfig(enabled=True)),
            get_preset("dapo"),
            r"regime_control.regime3_guard.enabled=True widens eps_high_neg, which loss_type='dapo' does not read",
        ),
        (
            RegimeControlConfig(regime4_guard=Regime4GuardConfig(enabled=True)),
            get_preset("online_sft"),
            "regime4_guard.enabled=True widens eps_low_neg, which loss_type='online_sft' does not read",
        ),
        (
            RegimeControlConfig(mode="entropy_band"),
            get_preset("cispo"),
            "mode='entropy_band' moves eps_high_pos and eps_low_pos, which loss_type='cispo' does not read",
        ),
        (
            RegimeControlConfig(mode="entropy_band", eps_high_pos_limits=(0.5, 5.0)),
            get_preset("dispo"),
            r"eps_high_pos_limits=\(0.5, 5.0\) excludes the loss's start value eps_high_pos=10.0; widen the limits",
        ),
        (
            RegimeControlConfig(regime3_guard=Regime3GuardConfig(enabled=True, eps_high_neg_limits=(1.0, 100.0))),
            get_preset("dispo_no_regime3"),
            r"regime3_guard.eps_high_neg_limits=\(1.0, 100.0\) excludes the loss's start value eps_high_neg=0.0",
        ),
    ],
)
def test_config_errors_against_the_loss(config: RegimeControlConfig, loss: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_regime_control(config, loss)
    with pytest.raises(ValueError, match=message):
        RegimeController(config, loss)


def test_run_config_reports_regime_control_errors_as_one_config_error_line() -> None:
    assert load_config(AlgorithmConfig, None, []).regime_control == RegimeControlConfig()
    loaded = load_config(
        AlgorithmConfig,
        None,
        ["regime_control.mode=entropy_band", "regime_control.regime3_guard={enabled: true, threshold: 0.1}"],
    )
    assert loaded.regime_control.mode == "entropy_band" and loaded.regime_control.regime3_guard.threshold == 0.1
    with pytest.raises(ConfigError, match=r"^regime_control: band_low \(2.0\) must be < band_high") as error:
        load_config(AlgorithmConfig, None, ["regime_control.band_low=2.0"])
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"^regime_control.regime3_guard: regime3_guard.eps_high_neg_step=1.0"):
        load_config(AlgorithmConfig, None, ["regime_control.regime3_guard.eps_high_neg_step=1.0"])
    with pytest.raises(ConfigError, match=r"regime_control\.regime3_guard\.enabled=True widens eps_high_neg, which "):
        load_config(AlgorithmConfig, None, ["preset=cispo", "regime_control.regime3_guard.enabled=true"])
