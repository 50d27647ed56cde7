"""Weight refit: stream the trainer's HF-named weights into the rollout engine in buckets, timed and self-checked."""

from megatron_dispo.refit.config import RefitConfig
from megatron_dispo.refit.probe import ProbeBatch, ProbeReport, RefitCheckError
from megatron_dispo.refit.refit import RefitMismatchError, RefitStats, Refitter, send_weights

__all__ = [
    "ProbeBatch",
    "ProbeReport",
    "RefitCheckError",
    "RefitConfig",
    "RefitMismatchError",
    "RefitStats",
    "Refitter",
    "send_weights",
]
