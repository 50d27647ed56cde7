"""The messages between training rank 0 and the dedicated rollout ranks, as types.

Order on the bridge (one total order both sides follow, so no send waits on a receive that comes later): the rollout
driver says :class:`Hello` (the probe batch it owns); the trainer broadcasts :class:`Start`; then the trainer
broadcasts a :class:`WeightsHeader` before each weight version it sends (the buckets follow on the weight channel),
the driver answers each batch with :class:`BatchReady` followed by the batch (codec table), and at the very end the
trainer broadcasts :class:`Stop`. A failing driver sends :class:`RolloutFailed` instead of its next message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron_dispo.refit import ProbeBatch

Reports = dict[int, dict[str, float]]
"""Metrics of a weight version, by version: its refit, probe check and held-out evaluation on the rollout ranks."""


@dataclass(frozen=True)
class Hello:
    """Rollout driver -> trainer, once: the refit probe batch (the driver owns the data)."""

    probe: ProbeBatch


@dataclass(frozen=True)
class Start:
    """Trainer -> rollout ranks, once: the first step to generate, the version the engines hold, the data order."""

    start_step: int
    version: int
    collector_state: dict[str, Any] | None


@dataclass(frozen=True)
class WeightsHeader:
    """Trainer -> rollout ranks, before each weight version's buckets."""

    version: int
    evaluate: bool
    """Evaluate the held-out set with this version once loaded."""
    probe_logprobs: list[Any] | None
    """The trainer's log-probs of the probe answers when a refit check is due (else None)."""
    reply_now: bool
    """No batch follows this version: the driver reports it at once (a :class:`VersionReports`)."""


@dataclass(frozen=True)
class Stop:
    """Trainer -> rollout ranks: nothing more comes."""


@dataclass(frozen=True)
class BatchReady:
    """Rollout driver -> trainer, before the batch ``step`` (a codec table on the bridge)."""

    step: int
    metrics: dict[str, float]
    collector_state: dict[str, Any]
    """The data order after this batch: a checkpoint at ``step`` resumes from it."""
    reports: Reports = field(default_factory=dict)


@dataclass(frozen=True)
class VersionReports:
    """Rollout driver -> trainer: reports of versions loaded after the last batch."""

    reports: Reports


@dataclass(frozen=True)
class RolloutFailed:
    """Rollout driver -> trainer, instead of its next message: why the rollout side stopped."""

    error: str
