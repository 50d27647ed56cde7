"""Adaptive DISPO: a controller that moves the four clip bounds between steps (issue 25).

DISPO (arXiv 2602.00983) sets its four bounds by hand; its limitations section asks for "adaptive or learned clipping
schedules". The paper's regime findings (Sec. 4) name the actuators:

* correct responses (A > 0): Regime 1 (r > 1, weight capped at 1 + eps_high_pos) raises the policy's entropy and
  Regime 2 (r < 1, weight floored at 1 - eps_low_pos) lowers it. The **entropy band** moves the two against each
  other: entropy above the band narrows eps_high_pos and widens eps_low_pos, entropy below it does the reverse.
* incorrect responses (A < 0): too tight an eps_high_neg (Regime 3) collapses into repetition, too tight an
  eps_low_neg (Regime 4) into vanishing response lengths. The **Regime 3 guard** widens eps_high_neg while a
  repetition signal is up, the **Regime 4 guard** widens eps_low_neg while the mean response length falls.

Every move is multiplicative and clamped to per-bound limits; hysteresis (patience, an inner release band, release
thresholds) keeps noise from flipping the moves. A guard that releases stops widening and keeps the bound it reached:
the paper's DISPO already uses nearly unclipped negative bounds (eps_low_neg = 1, eps_high_neg = 100), so a wide
negative bound is the safe side and narrowing it again would re-arm the collapse.

Pure Python (no torch, no I/O). The trainer calls, per step t:

    loss_config_t = apply_bounds(loss_config, controller.bounds())   # train step t with these bounds
    controller.observe(StepSignals(entropy=..., response_length_mean=..., repetition_truncated_share=...))
    log(controller.metrics())                                        # step t's bounds, signals and decisions

and saves `controller.state_dict()` (plain JSON types) in its checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from megatron_dispo.algorithms.loss_config import PolicyLossConfig

RegimeControlMode = Literal["off", "entropy_band"]
BandReference = Literal["absolute", "calibrated"]
RepetitionSignal = Literal["repetition_truncated_share", "repeated_ngram_rate"]

POSITIVE_PAIR_LOSSES: frozenset[str] = frozenset({"dispo", "online_sft"})
"""Losses that read eps_high_pos / eps_low_pos (the entropy band's actuators)."""
NEGATIVE_PAIR_LOSSES: frozenset[str] = frozenset({"dispo"})
"""Losses that read eps_high_neg / eps_low_neg (the guards' actuators)."""
BOUND_NAMES: tuple[str, ...] = ("eps_high_pos", "eps_low_pos", "eps_high_neg", "eps_low_neg")
STATE_FORMAT = 1
"""Version of `RegimeController.state_dict`; bump when its layout changes."""


class ClipBounds(NamedTuple):
    """DISPO's four clip bounds (Eq. 9): the weight of a correct token is clipped to [1 - eps_low_pos,
    1 + eps_high_pos], that of an incorrect token to [1 - eps_low_neg, 1 + eps_high_neg]."""

    eps_high_pos: float
    eps_low_pos: float
    eps_high_neg: float
    eps_low_neg: float

    @classmethod
    def of(cls, loss: PolicyLossConfig) -> ClipBounds:
        """The bounds a loss config carries."""
        return cls(loss.eps_high_pos, loss.eps_low_pos, loss.eps_high_neg, loss.eps_low_neg)


def apply_bounds(loss: PolicyLossConfig, bounds: ClipBounds) -> PolicyLossConfig:
    """`loss` with the controller's bounds in place of its own (validated again by `PolicyLossConfig`)."""
    return dataclasses.replace(loss, **bounds._asdict())


@dataclass(frozen=True)
class BoundSchedule:
    """Where and how fast the controller may move one bound."""

    minimum: float
    maximum: float
    step: float
    """Multiplicative step (> 1): widening multiplies the bound by it, narrowing divides it."""
    widen_from: float
    """A widening move from below this value lands on it (multiplying 0, a switched-off regime, would stay 0)."""

    def widen(self, value: float) -> float:
        return min(max(value * self.step, self.widen_from), self.maximum)

    def narrow(self, value: float) -> float:
        return max(value / self.step, self.minimum)


@dataclass(frozen=True)
class Regime3GuardConfig:
    """Widens eps_high_neg while responses repeat themselves (DISPO Sec. 4: a tight Regime 3 brings repetition)."""

    enabled: bool = False
    """Switch of this guard (independent of `mode`)."""
    signal: RepetitionSignal = "repetition_truncated_share"
    """Which measurement is the repetition signal: the share of responses the engine cut for looping
    (rollout's repetition detector), or the mean `repetition.repeated_ngram_rate` of the responses."""
    ngram_size: int = 8
    """n of `repeated_ngram_rate` (used when signal = repeated_ngram_rate)."""
    threshold: float = 0.05
    """The guard fires after `patience` steps in a row with the signal above this."""
    release_threshold: float = 0.02
    """... and releases after `patience` steps in a row with the signal at or below this (<= threshold)."""
    patience: int = 2
    """Consecutive steps needed to fire or to release."""
    eps_high_neg_limits: tuple[float, float] = (0.0, 100.0)
    """(minimum, maximum) of eps_high_neg; must contain the loss's start value. 100 is DISPO's own value."""
    eps_high_neg_step: float = 4.0
    """Factor per widening step (> 1)."""
    eps_high_neg_widen_from: float = 1.0
    """First widening of a bound below this (e.g. 0, Regime 3 off) lands on it."""

    def __post_init__(self) -> None:
        _check_bool("regime3_guard.enabled", self.enabled)
        _check_choice("regime3_guard.signal", self.signal, ("repetition_truncated_share", "repeated_ngram_rate"))
        _check_int("regime3_guard.ngram_size", self.ngram_size, 1, "e.g. 8")
        _check_int("regime3_guard.patience", self.patience, 1, "e.g. 2")
        for name in ("threshold", "release_threshold"):
            value = getattr(self, name)
            if not _is_finite_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"regime3_guard.{name}={value!r} must be a share in [0, 1], e.g. 0.05.")
        if self.release_threshold > self.threshold:
            raise ValueError(
                f"regime3_guard.release_threshold ({self.release_threshold}) must be <= regime3_guard.threshold "
                f"({self.threshold}): the guard releases below where it fires; lower release_threshold."
            )
        _check_schedule("regime3_guard.eps_high_neg", self.schedule, upper_cap=None)

    @property
    def schedule(self) -> BoundSchedule:
        return BoundSchedule(*self.eps_high_neg_limits, self.eps_high_neg_step, self.eps_high_neg_widen_from)


@dataclass(frozen=True)
class Regime4GuardConfig:
    """Widens eps_low_neg while the mean response length falls (DISPO Sec. 4: a tight Regime 4 brings vanishing
    lengths)."""

    enabled: bool = False
    """Switch of this guard (independent of `mode`)."""
    window: int = 5
    """The fall is measured against the mean response length `window` steps earlier: drop_t = 1 - L_t / L_{t-window}."""
    fall_fraction: float = 0.2
    """The guard fires after `patience` steps in a row with drop_t above this."""
    release_fall_fraction: float = 0.05
    """... and releases after `patience` steps in a row with drop_t at or below this (< fall_fraction)."""
    patience: int = 2
    """Consecutive steps needed to fire or to release."""
    eps_low_neg_limits: tuple[float, float] = (0.0, 1.0)
    """(minimum, maximum) of eps_low_neg, within [0, 1]; must contain the loss's start value. 1 is DISPO's value."""
    eps_low_neg_step: float = 2.0
    """Factor per widening step (> 1)."""
    eps_low_neg_widen_from: float = 0.1
    """First widening of a bound below this (e.g. 0, Regime 4 off) lands on it."""

    def __post_init__(self) -> None:
        _check_bool("regime4_guard.enabled", self.enabled)
        _check_int("regime4_guard.window", self.window, 1, "e.g. 5")
        _check_int("regime4_guard.patience", self.patience, 1, "e.g. 2")
        if not _is_finite_number(self.fall_fraction) or not 0.0 < self.fall_fraction < 1.0:
            raise ValueError(f"regime4_guard.fall_fraction={self.fall_fraction!r} must be in (0, 1), e.g. 0.2.")
        fraction = self.release_fall_fraction
        if not _is_finite_number(fraction) or not 0.0 <= fraction < self.fall_fraction:
            raise ValueError(
                f"regime4_guard.release_fall_fraction={fraction!r} must be in [0, fall_fraction={self.fall_fraction}):"
                " the guard releases below where it fires; e.g. 0.05."
            )
        _check_schedule("regime4_guard.eps_low_neg", self.schedule, upper_cap=1.0)

    @property
    def schedule(self) -> BoundSchedule:
        return BoundSchedule(*self.eps_low_neg_limits, self.eps_low_neg_step, self.eps_low_neg_widen_from)


@dataclass(frozen=True)
class RegimeControlConfig:
    """`algorithm.regime_control`: the entropy band (`mode`) and the two collapse guards, each with its own switch.
    Off by default; the controller runs when any of the three is on (`active`)."""

    # entropy band: moves eps_high_pos and eps_low_pos (Regimes 1 and 2)
    mode: RegimeControlMode = "off"
    """'entropy_band' keeps the policy's mean token entropy inside [band_low, band_high]; 'off' leaves the positive
    bounds alone."""
    band_reference: BandReference = "calibrated"
    """'absolute': band_low / band_high are nats. 'calibrated': they are factors of the mean entropy of the first
    `calibration_steps` steps (no moves during those steps)."""
    band_low: float = 0.8
    """Lower edge of the band (nats, or a factor of the calibrated entropy)."""
    band_high: float = 1.25
    """Upper edge of the band (nats, or a factor of the calibrated entropy)."""
    calibration_steps: int = 3
    """Steps whose entropy is averaged into the reference (band_reference = calibrated)."""
    patience: int = 2
    """Steps in a row outside the band before the controller moves the bounds."""
    release_fraction: float = 0.25
    """Hysteresis: a correction stops once entropy is back inside the inner band, the band shrunk by this fraction of
    its width at each edge (0: stop as soon as it re-enters the band). In [0, 0.5)."""
    eps_high_pos_limits: tuple[float, float] = (0.28, 10.0)
    """(minimum, maximum) of eps_high_pos; must contain the loss's start value. 0.28 is DAPO's clip-higher value,
    10 DISPO's; min = max = start pins the bound."""
    eps_high_pos_step: float = 1.5
    """Factor per move (> 1)."""
    eps_high_pos_widen_from: float = 0.28
    """A widening move from below this (e.g. 0, Regime 1 off) lands on it."""
    eps_low_pos_limits: tuple[float, float] = (0.05, 1.0)
    """(minimum, maximum) of eps_low_pos, within [0, 1]; must contain the loss's start value (DISPO: 0.2)."""
    eps_low_pos_step: float = 1.25
    """Factor per move (> 1)."""
    eps_low_pos_widen_from: float = 0.05
    """A widening move from below this (e.g. 0, Regime 2 off) lands on it."""

    # collapse guards: move eps_high_neg (Regime 3) and eps_low_neg (Regime 4)
    regime3_guard: Regime3GuardConfig = field(default_factory=Regime3GuardConfig)
    regime4_guard: Regime4GuardConfig = field(default_factory=Regime4GuardConfig)

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, ("off", "entropy_band"))
        _check_choice("band_reference", self.band_reference, ("absolute", "calibrated"))
        for name in ("band_low", "band_high"):
            value = getattr(self, name)
            if not _is_finite_number(value) or value < 0.0:
                raise ValueError(f"{name}={value!r} must be a finite number >= 0 (nats or a factor of the entropy).")
        if self.band_low >= self.band_high:
            raise ValueError(
                f"band_low ({self.band_low}) must be < band_high ({self.band_high}): the band is upside down or "
                "empty; swap them or widen the band."
            )
        if self.band_reference == "calibrated" and self.band_low <= 0.0:
            raise ValueError(
                f"band_low={self.band_low} must be > 0 with band_reference=calibrated (a factor of the measured "
                "entropy), e.g. 0.8."
            )
        _check_int("calibration_steps", self.calibration_steps, 1, "e.g. 3")
        _check_int("patience", self.patience, 1, "e.g. 2")
        if not _is_finite_number(self.release_fraction) or not 0.0 <= self.release_fraction < 0.5:
            raise ValueError(
                f"release_fraction={self.release_fraction!r} must be in [0, 0.5): the inner band is the band shrunk "
                "by this fraction of its width at each edge; e.g. 0.25."
            )
        _check_schedule("eps_high_pos", self.schedule("eps_high_pos"), upper_cap=None)
        _check_schedule("eps_low_pos", self.schedule("eps_low_pos"), upper_cap=1.0)
        if not isinstance(self.regime3_guard, Regime3GuardConfig):
            raise ValueError(f"regime3_guard={self.regime3_guard!r} must be a Regime3GuardConfig.")
        if not isinstance(self.regime4_guard, Regime4GuardConfig):
            raise ValueError(f"regime4_guard={self.regime4_guard!r} must be a Regime4GuardConfig.")

    @property
    def active(self) -> bool:
        """True when the entropy band or a guard is on, i.e. the trainer must run a `RegimeController`."""
        return self.mode != "off" or self.regime3_guard.enabled or self.regime4_guard.enabled

    def schedule(self, bound: str) -> BoundSchedule:
        """The limits, step and widening floor of one of the four bounds."""
        if bound == "eps_high_neg":
            return self.regime3_guard.schedule
        if bound == "eps_low_neg":
            return self.regime4_guard.schedule
        if bound not in ("eps_high_pos", "eps_low_pos"):
            raise ValueError(f"bound={bound!r} is not a DISPO bound; use one of {list(BOUND_NAMES)}.")
        limits = getattr(self, f"{bound}_limits")
        return BoundSchedule(*limits, getattr(self, f"{bound}_step"), getattr(self, f"{bound}_widen_from"))

    def moved_bounds(self) -> tuple[str, ...]:
        """The bounds this configuration may move."""
        moved = ("eps_high_pos", "eps_low_pos") if self.mode == "entropy_band" else ()
        moved += ("eps_high_neg",) if self.regime3_guard.enabled else ()
        return moved + (("eps_low_neg",) if self.regime4_guard.enabled else ())


def check_regime_control(config: RegimeControlConfig, loss: PolicyLossConfig) -> None:
    """ValueError (one line: the field, the rule, the fix) unless `config` can steer `loss`: the loss reads every bound
    the config moves, and each moved bound starts inside its limits."""
    if config.mode == "entropy_band" and loss.loss_type not in POSITIVE_PAIR_LOSSES:
        raise ValueError(
            f"regime_control.mode='entropy_band' moves eps_high_pos and eps_low_pos, which loss_type="
            f"{loss.loss_type!r} does not read (only {sorted(POSITIVE_PAIR_LOSSES)} do); set mode=off or use a dispo "
            "preset."
        )
    for guard, bound in (("regime3_guard", "eps_high_neg"), ("regime4_guard", "eps_low_neg")):
        if getattr(config, guard).enabled and loss.loss_type not in NEGATIVE_PAIR_LOSSES:
            raise ValueError(
                f"regime_control.{guard}.enabled=True widens {bound}, which loss_type={loss.loss_type!r} does not "
                f"read (only {sorted(NEGATIVE_PAIR_LOSSES)} does); switch the guard off or use a dispo preset."
            )
    for bound in config.moved_bounds():
        _check_inside_limits(config, bound, getattr(loss, bound), "the loss's start value")


@dataclass(frozen=True)
class StepSignals:
    """What the trainer measured on one step; the controller reads the signals its switched-on parts need."""

    entropy: float | None = None
    """Mean token entropy of the policy over the step's response tokens (nats); needed by mode=entropy_band."""
    response_length_mean: float | None = None
    """Mean response length in tokens; needed by the Regime 4 guard."""
    repetition_truncated_share: float | None = None
    """Share of responses cut for looping; needed by the Regime 3 guard with signal=repetition_truncated_share."""
    repeated_ngram_rate: float | None = None
    """Mean `repeated_ngram_rate` of the responses; needed by the Regime 3 guard with signal=repeated_ngram_rate."""


@dataclass
class _GuardState:
    """Fire / release counting shared by both guards."""

    active: bool = False
    steps_over: int = 0
    steps_under: int = 0

    def update(self, signal: float, fire_above: float, release_at_or_below: float, patience: int) -> None:
        if signal > fire_above:
            self.steps_over, self.steps_under = self.steps_over + 1, 0
        elif signal <= release_at_or_below:
            self.steps_over, self.steps_under = 0, self.steps_under + 1
        else:
            self.steps_over = self.steps_under = 0
        if not self.active and self.steps_over >= patience:
            self.active = True
        elif self.active and self.steps_under >= patience:
            self.active = False


class RegimeController:
    """Moves DISPO's clip bounds between steps from the step's measured signals (see the module docstring)."""

    def __init__(self, config: RegimeControlConfig, loss: PolicyLossConfig) -> None:
        check_regime_control(config, loss)
        self.config = config
        self._bounds = ClipBounds.of(loss)
        self._trained_bounds: ClipBounds | None = None
        self._steps_observed = 0
        self._calibration_entropies: list[float] = []
        self._entropy_reference: float | None = None
        self._steps_above = 0
        self._steps_below = 0
        self._entropy_direction = 0
        self._last_entropy: float | None = None
        self._regime3 = _GuardState()
        self._last_repetition: float | None = None
        self._regime4 = _GuardState()
        self._recent_lengths: list[float] = []
        self._last_length: float | None = None
        self._last_length_drop: float | None = None

    def bounds(self) -> ClipBounds:
        """The bounds the next training step uses."""
        return self._bounds

    def band(self) -> tuple[float, float] | None:
        """The entropy band in nats, or None (mode off, or still calibrating)."""
        if self.config.mode == "off":
            return None
        if self.config.band_reference == "absolute":
            return self.config.band_low, self.config.band_high
        if self._entropy_reference is None:
            return None
        return self.config.band_low * self._entropy_reference, self.config.band_high * self._entropy_reference

    def observe(self, signals: StepSignals) -> None:
        """Read the signals of the step just trained with `bounds()` and set the bounds of the next step."""
        self._trained_bounds = self._bounds
        bounds = self._bounds._asdict()
        if self.config.mode == "entropy_band":
            entropy = _required_signal(signals, "entropy", "mode=entropy_band")
            self._entropy_step(entropy, bounds)
        guard3 = self.config.regime3_guard
        if guard3.enabled:
            repetition = _required_signal(signals, guard3.signal, f"regime3_guard (signal={guard3.signal})")
            self._last_repetition = repetition
            self._regime3.update(repetition, guard3.threshold, guard3.release_threshold, guard3.patience)
            if self._regime3.active:
                bounds["eps_high_neg"] = guard3.schedule.widen(bounds["eps_high_neg"])
        guard4 = self.config.regime4_guard
        if guard4.enabled:
            length = _required_signal(signals, "response_length_mean", "regime4_guard")
            self._length_step(length, guard4)
            if self._regime4.active:
                bounds["eps_low_neg"] = guard4.schedule.widen(bounds["eps_low_neg"])
        self._bounds = ClipBounds(**bounds)
        self._steps_observed += 1

    def _entropy_step(self, entropy: float, bounds: dict[str, float]) -> None:
        """Regimes 1 and 2 against each other: entropy too high -> narrow eps_high_pos, widen eps_low_pos."""
        self._last_entropy = entropy
        config = self.config
        if config.band_reference == "calibrated" and self._entropy_reference is None:
            self._calibration_entropies.append(entropy)
            if len(self._calibration_entropies) == config.calibration_steps:
                self._entropy_reference = math.fsum(self._calibration_entropies) / config.calibration_steps
            return
        band = self.band()
        assert band is not None  # absolute, or calibrated with a reference
        low, high = band
        margin = config.release_fraction * (high - low)
        if entropy > high:
            self._steps_above, self._steps_below = self._steps_above + 1, 0
        elif entropy < low:
            self._steps_above, self._steps_below = 0, self._steps_below + 1
        else:
            self._steps_above = self._steps_below = 0
        if (self._entropy_direction > 0 and entropy <= high - margin) or (
            self._entropy_direction < 0 and entropy >= low + margin
        ):
            self._entropy_direction = 0  # back inside the inner band (or past it): stop correcting
        if self._steps_above >= config.patience:
            self._entropy_direction = 1
        elif self._steps_below >= config.patience:
            self._entropy_direction = -1
        high_pos, low_pos = config.schedule("eps_high_pos"), config.schedule("eps_low_pos")
        if self._entropy_direction > 0:  # lower entropy: less Regime 1, more Regime 2
            bounds["eps_high_pos"] = high_pos.narrow(bounds["eps_high_pos"])
            bounds["eps_low_pos"] = low_pos.widen(bounds["eps_low_pos"])
        elif self._entropy_direction < 0:  # raise entropy: more Regime 1, less Regime 2
            bounds["eps_high_pos"] = high_pos.widen(bounds["eps_high_pos"])
            bounds["eps_low_pos"] = low_pos.narrow(bounds["eps_low_pos"])

    def _length_step(self, length: float, guard: Regime4GuardConfig) -> None:
        """Regime 4 guard: drop_t = 1 - L_t / L_{t-window}; no evidence until `window` earlier steps are known."""
        self._last_length = length
        drop: float | None = None
        if len(self._recent_lengths) == guard.window:
            reference = self._recent_lengths[0]
            drop = 1.0 - length / reference if reference > 0 else 0.0
        self._recent_lengths = [*self._recent_lengths, length][-guard.window :]
        self._last_length_drop = drop
        if drop is not None:
            self._regime4.update(drop, guard.fall_fraction, guard.release_fall_fraction, guard.patience)

    def metrics(self) -> dict[str, float]:
        """The last observed step under `control/`: the bounds it trained with, its signals, the band in nats and the
        decisions that set the next step's bounds. A signal not measured, or a band not known yet (off, calibrating),
        is left out rather than logged as NaN (a metrics line compares equal only without NaN)."""
        trained = self._trained_bounds if self._trained_bounds is not None else self._bounds
        band = self.band() or (math.nan, math.nan)
        calibrating = self.config.mode == "entropy_band" and self.config.band_reference == "calibrated"
        values = {
            **{f"control/{name}": float(value) for name, value in trained._asdict().items()},
            "control/entropy": _or_nan(self._last_entropy),
            "control/band_low": band[0],
            "control/band_high": band[1],
            "control/calibrating": float(calibrating and self._entropy_reference is None),
            "control/entropy_direction": float(self._entropy_direction),
            "control/repetition": _or_nan(self._last_repetition),
            "control/regime3_guard": float(self._regime3.active),
            "control/response_length_mean": _or_nan(self._last_length),
            "control/length_drop": _or_nan(self._last_length_drop),
            "control/regime4_guard": float(self._regime4.active),
        }
        return {key: value for key, value in values.items() if not math.isnan(value)}

    def state_dict(self) -> dict[str, Any]:
        """Everything `observe` depends on, as plain JSON types: a controller loaded from it continues exactly."""
        return {
            "format": STATE_FORMAT,
            "steps_observed": self._steps_observed,
            "bounds": self._bounds._asdict(),
            "trained_bounds": None if self._trained_bounds is None else self._trained_bounds._asdict(),
            "calibration_entropies": list(self._calibration_entropies),
            "entropy_reference": self._entropy_reference,
            "steps_above": self._steps_above,
            "steps_below": self._steps_below,
            "entropy_direction": self._entropy_direction,
            "last_entropy": self._last_entropy,
            "regime3": dataclasses.asdict(self._regime3),
            "last_repetition": self._last_repetition,
            "regime4": dataclasses.asdict(self._regime4),
            "recent_lengths": list(self._recent_lengths),
            "last_length": self._last_length,
            "last_length_drop": self._last_length_drop,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output; ValueError when it is of another format or its bounds leave this run's
        limits (the run's regime_control config changed since the checkpoint)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"regime controller state has format {state.get('format')!r}, this code reads {STATE_FORMAT}; "
                "resume with the code that wrote the checkpoint."
            )
        missing = sorted(set(self.state_dict()) - set(state))
        if missing:
            raise ValueError(f"regime controller state lacks {missing}; the checkpoint is incomplete.")
        bounds = ClipBounds(**state["bounds"])
        for bound in self.config.moved_bounds():
            _check_inside_limits(self.config, bound, getattr(bounds, bound), "the checkpointed value")
        self._bounds = bounds
        trained = state["trained_bounds"]
        self._trained_bounds = None if trained is None else ClipBounds(**trained)
        self._steps_observed = int(state["steps_observed"])
        self._calibration_entropies = [float(v) for v in state["calibration_entropies"]]
        self._entropy_reference = state["entropy_reference"]
        self._steps_above = int(state["steps_above"])
        self._steps_below = int(state["steps_below"])
        self._entropy_direction = int(state["entropy_direction"])
        self._last_entropy = state["last_entropy"]
        self._regime3 = _GuardState(**state["regime3"])
        self._last_repetition = state["last_repetition"]
        self._regime4 = _GuardState(**state["regime4"])
        self._recent_lengths = [float(v) for v in state["recent_lengths"]]
        self._last_length = state["last_length"]
        self._last_length_drop = state["last_length_drop"]


def _required_signal(signals: StepSignals, name: str, needed_by: str) -> float:
    value = getattr(signals, name)
    if value is None:
        raise ValueError(f"StepSignals.{name} is None but {needed_by} needs it; measure it every step.")
    if not _is_finite_number(value) or value < 0.0:
        raise ValueError(f"StepSignals.{name}={value!r} must be a finite number >= 0.")
    return float(value)


def _check_inside_limits(config: RegimeControlConfig, bound: str, value: float, what: str) -> None:
    schedule = config.schedule(bound)
    if not schedule.minimum <= value <= schedule.maximum:
        raise ValueError(
            f"regime_control.{_limits_field(bound)}=({schedule.minimum}, {schedule.maximum}) excludes {what} "
            f"{bound}={value}; widen the limits to include it, or start {bound} inside them."
        )


def _limits_field(bound: str) -> str:
    prefix = {"eps_high_neg": "regime3_guard.", "eps_low_neg": "regime4_guard."}.get(bound, "")
    return f"{prefix}{bound}_limits"


def _check_schedule(name: str, schedule: BoundSchedule, upper_cap: float | None) -> None:
    """Limits ordered and inside the bound's valid range, step > 1, widen_from > 0 (above the maximum it acts as the
    maximum: every move is clamped to the limits)."""
    low, high = schedule.minimum, schedule.maximum
    if not (_is_finite_number(low) and _is_finite_number(high)) or low < 0.0:
        raise ValueError(f"{name}_limits=({low!r}, {high!r}) must be finite numbers >= 0.")
    if low > high:
        raise ValueError(f"{name}_limits=({low}, {high}) is upside down (minimum > maximum); swap them.")
    if upper_cap is not None and high > upper_cap:
        raise ValueError(
            f"{name}_limits=({low}, {high}) exceeds {upper_cap}: the lower clip bound 1 - eps must stay >= 0; "
            f"use a maximum <= {upper_cap}."
        )
    if not _is_finite_number(schedule.step) or schedule.step <= 1.0:
        raise ValueError(
            f"{name}_step={schedule.step!r} must be > 1: each move multiplies or divides the bound by it; e.g. 1.5."
        )
    if not _is_finite_number(schedule.widen_from) or schedule.widen_from <= 0.0:
        raise ValueError(
            f"{name}_widen_from={schedule.widen_from!r} must be a finite number > 0, or a bound at 0 could never "
            "widen; e.g. the smallest value at which the regime does something useful."
        )


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not a valid choice; use one of {list(choices)}.")


def _check_int(name: str, value: object, minimum: int, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}, {example}.")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be true or false.")


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else float(value)
