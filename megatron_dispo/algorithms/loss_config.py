"""`PolicyLossConfig`: every knob of the policy losses in one frozen, validated dataclass.

Clip bounds are written as in the papers: the IS weight (or ratio) is clipped to [1 - eps_low, 1 + eps_high].
eps = 0 on one side disables that side's regime (the weight is clipped to exactly 1 there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

from megatron_dispo.algorithms.registry import registered_loss_names

ConditionOn = Literal["advantage_sign", "correctness"]
AggregationChoice = Literal["default", "token_mean", "seq_mean_token_mean"]
OnlineSftCoefficient = Literal["one", "advantage"]


@dataclass(frozen=True)
class PolicyLossConfig:
    """Configuration of `compute_policy_loss` (DISPO, arXiv 2602.00983, and its baselines)."""

    # which loss
    loss_type: str = "dispo"
    """Registered loss name: dispo, cispo, dapo, grpo, reinforce, online_sft, gspo, sspo (or one you register)."""

    # DISPO (Eqs. 8-9): one bound pair per side
    eps_low_pos: float = 0.2
    """DISPO, positive side (A > 0 / correct): weight >= 1 - eps_low_pos. Regime 2 (r < 1); 0 disables it."""
    eps_high_pos: float = 10.0
    """DISPO, positive side: weight <= 1 + eps_high_pos. Regime 1 (r > 1); 0 disables it."""
    eps_low_neg: float = 1.0
    """DISPO, negative side (A < 0 / incorrect): weight >= 1 - eps_low_neg. Regime 4 (r < 1); 0 disables it."""
    eps_high_neg: float = 100.0
    """DISPO, negative side: weight <= 1 + eps_high_neg. Regime 3 (r > 1); 0 disables it."""

    # one shared pair: cispo (Eq. 7), dapo (Eqs. 4-5), grpo (Eqs. 1-2), gspo, sspo
    eps_low: float = 0.2
    """Shared lower clip: ratio/weight >= 1 - eps_low (cispo, dapo, grpo, gspo, sspo)."""
    eps_high: float = 0.28
    """Shared upper clip: ratio/weight <= 1 + eps_high (cispo, dapo, grpo, gspo, sspo)."""

    # how tokens pick a bound pair
    condition_on: ConditionOn = "advantage_sign"
    """'advantage_sign': the pair is chosen by sign(A) (paper). 'correctness': by the `correct` tensor; the two
    differ once rewards are shaped (overlong penalty), and the metrics log how often."""

    aggregation: AggregationChoice = "default"
    """'default' uses the loss's paper aggregation (token_mean for dispo/cispo/dapo/online_sft, seq_mean_token_mean
    for grpo/reinforce/gspo/sspo); the other values override it."""

    # online SFT (Table 1 baseline and the +Regime ablations)
    online_sft_coefficient: OnlineSftCoefficient = "one"
    """Per-token coefficient on correct responses: 'one' (supervised fine-tuning on self-generated correct answers)
    or 'advantage' (use A, i.e. DISPO restricted to positive samples). Incorrect responses never contribute."""

    # SSPO (arXiv 2511.04256): subsentence ratio with entropy-adaptive clip bounds
    sspo_segment_len: int = 32
    """Fallback subsentence length in tokens when no `segment_ids` are passed (fixed windows)."""
    sspo_entropy_ref: float = 1.0
    """Entropy (nats) at which a subsentence keeps the base bounds; bounds scale with mean entropy / this."""
    sspo_scale_min: float = 0.5
    """Smallest bound scale (low-entropy subsentences get bounds at least this fraction of eps)."""
    sspo_scale_max: float = 2.0
    """Largest bound scale (high-entropy subsentences get at most this multiple of eps)."""

    def __post_init__(self) -> None:
        names = registered_loss_names()
        if self.loss_type not in names:
            raise ValueError(f"loss_type={self.loss_type!r} is not a registered policy loss; use one of {names}.")
        for name in ("eps_low_pos", "eps_low_neg", "eps_low"):
            value = getattr(self, name)
            if not _is_finite_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"{name}={value!r} must be a finite number in [0, 1]: the lower clip bound is 1 - {name} and a "
                    f"ratio is never negative; use 1.0 for no lower clipping or 0.0 to disable the regime."
                )
        for name in ("eps_high_pos", "eps_high_neg", "eps_high"):
            value = getattr(self, name)
            if not _is_finite_number(value) or value < 0.0:
                raise ValueError(
                    f"{name}={value!r} must be a finite number >= 0 (the upper clip bound is 1 + {name}); "
                    "use 0.0 to disable the regime or a large finite value such as 100.0 for almost no clipping."
                )
        _check_choice("condition_on", self.condition_on, ("advantage_sign", "correctness"))
        _check_choice("aggregation", self.aggregation, ("default", "token_mean", "seq_mean_token_mean"))
        _check_choice("online_sft_coefficient", self.online_sft_coefficient, ("one", "advantage"))
        if isinstance(self.sspo_segment_len, bool) or not isinstance(self.sspo_segment_len, int):
            raise ValueError(f"sspo_segment_len={self.sspo_segment_len!r} must be an int >= 1, e.g. 32.")
        if self.sspo_segment_len < 1:
            raise ValueError(f"sspo_segment_len={self.sspo_segment_len} must be >= 1, e.g. 32.")
        if not _is_finite_number(self.sspo_entropy_ref) or self.sspo_entropy_ref <= 0.0:
            raise ValueError(
                f"sspo_entropy_ref={self.sspo_entropy_ref!r} must be a finite number > 0 (nats), e.g. 1.0."
            )
        for name in ("sspo_scale_min", "sspo_scale_max"):
            value = getattr(self, name)
            if not _is_finite_number(value) or value <= 0.0:
                raise ValueError(f"{name}={value!r} must be a finite number > 0.")
        if self.sspo_scale_min > self.sspo_scale_max:
            raise ValueError(
                f"sspo_scale_min ({self.sspo_scale_min}) must be <= sspo_scale_max ({self.sspo_scale_max}); swap them."
            )

    def eps_table(self) -> dict[str, float]:
        """The four DISPO bounds and the shared pair, for logging and the preset table."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name.startswith("eps_")}


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not a valid choice; use one of {list(choices)}.")
