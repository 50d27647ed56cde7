"""Config dataclasses of the trainer's own sections: metric logging and DAPO dynamic sampling.

Kept apart from the code that uses them (:mod:`.metrics`, :mod:`.rollout_phase`) so that ``megatron_dispo.config`` can
assemble the run's config tree without importing the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["DynamicSamplingConfig", "LoggingConfig"]


@dataclass(frozen=True)
class LoggingConfig:
    """Where the per-step metrics go besides ``metrics.jsonl`` (see :mod:`.metrics`)."""

    tensorboard: bool = True
    """Write TensorBoard event files under ``<run_dir>/tensorboard``."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the ``wandb`` package)."""
    wandb_project: str = "megatron-dispo"
    """W&B project name."""
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    """``offline`` works without network; sync later with ``wandb sync``."""
    console_keys: tuple[str, ...] = (
        "eval/heldout/accuracy",
        "rollout/accuracy",
        "rollout/reward/mean",
        "rollout/response/len_mean",
        "train/loss",
        "train/entropy",
        "train/clip_frac",
        "perf/time/step_s",
    )
    """Keys shown on the one-line per-step console summary (all keys always go to the files)."""


@dataclass(frozen=True)
class DynamicSamplingConfig:
    """DAPO dynamic sampling: keep mixed-correctness groups, re-sample to fill the batch (:mod:`.rollout_phase`)."""

    enabled: bool = True
    """Keep only groups with mixed correctness (DAPO). Off: the first sampled batch is used as is."""
    oversample_factor: float = 1.5
    """Prompts sampled per round = ceil(missing groups x this factor)."""
    max_rounds: int = 4
    """Give up filling after this many sampling rounds; the step then trains on the groups it has."""
    max_cached_groups: int = 256
    """Leftover kept groups carried to the next step (oldest dropped beyond this)."""

    def __post_init__(self) -> None:
        if not self.oversample_factor >= 1.0:
            raise ValueError(f"oversample_factor={self.oversample_factor} must be >= 1.0 (1.0 = no over-sampling).")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds={self.max_rounds} must be >= 1.")
        if self.max_cached_groups < 0:
            raise ValueError(f"max_cached_groups={self.max_cached_groups} must be >= 0 (0 disables the cache).")
