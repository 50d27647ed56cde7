"""megatron_dispo.algorithms: the paper's maths in pure torch (no Megatron, no vLLM, no I/O).

losses.compute_policy_loss + PolicyLossConfig + presets.get_preset are the entry points of the policy losses;
advantages, filters, shaping, repetition and tis are the rollout-side pieces (Eq. 3, DAPO dynamic sampling and
overlong shaping, loop detection, truncated importance sampling); regime_control moves the DISPO clip bounds between
steps (adaptive DISPO).
"""

from megatron_dispo.algorithms.advantages import group_relative_advantages
from megatron_dispo.algorithms.filters import DynamicSamplingResult, filter_mixed_groups
from megatron_dispo.algorithms.loss_config import PolicyLossConfig
from megatron_dispo.algorithms.losses import compute_policy_loss  # registers the built-in losses (see registry.py)
from megatron_dispo.algorithms.presets import PRESETS, get_preset, preset_names
from megatron_dispo.algorithms.regime_control import (
    ClipBounds,
    RegimeControlConfig,
    RegimeController,
    StepSignals,
    apply_bounds,
)
from megatron_dispo.algorithms.registry import POLICY_LOSSES, get_policy_loss, register_policy_loss
from megatron_dispo.algorithms.repetition import (
    RepetitionConfig,
    RepetitionHit,
    batch_repeated_ngram_rate,
    detect_repetition,
    detect_repetition_batch,
    repeated_ngram_rate,
)
from megatron_dispo.algorithms.shaping import OverlongConfig, apply_overlong_penalty, overlong_penalty
from megatron_dispo.algorithms.sspo import segment_ids_from_delimiters
from megatron_dispo.algorithms.telemetry import METRIC_REDUCTIONS, pack_metrics, reduce_metrics, unpack_metrics
from megatron_dispo.algorithms.tis import truncated_is_weights

__all__ = [
    "METRIC_REDUCTIONS",
    "POLICY_LOSSES",
    "PRESETS",
    "ClipBounds",
    "DynamicSamplingResult",
    "OverlongConfig",
    "PolicyLossConfig",
    "RegimeControlConfig",
    "RegimeController",
    "RepetitionConfig",
    "RepetitionHit",
    "StepSignals",
    "apply_bounds",
    "apply_overlong_penalty",
    "batch_repeated_ngram_rate",
    "compute_policy_loss",
    "detect_repetition",
    "detect_repetition_batch",
    "filter_mixed_groups",
    "get_policy_loss",
    "get_preset",
    "group_relative_advantages",
    "overlong_penalty",
    "pack_metrics",
    "preset_names",
    "reduce_metrics",
    "register_policy_loss",
    "repeated_ngram_rate",
    "segment_ids_from_delimiters",
    "truncated_is_weights",
    "unpack_metrics",
]
