"""megatron_dispo.rollout: the vLLM rollout engine (grouped sampling, scoring, live weight updates, loop truncation).

Importing this package (as loading a run config does, for ``RolloutConfig``) imports neither the engine nor vLLM and
changes no environment variable: ``RolloutEngine`` is imported on first use, and vLLM only when an engine starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from megatron_dispo.rollout.batch import FinishReason, RolloutBatch
from megatron_dispo.rollout.config import RolloutConfig
from megatron_dispo.rollout.placement import ReplicaPlacement

if TYPE_CHECKING:
    from megatron_dispo.rollout.engine import RolloutEngine
    from megatron_dispo.rollout.replicas import ReplicaError, ReplicatedEngine

__all__ = [
    "FinishReason",
    "ReplicaError",
    "ReplicaPlacement",
    "ReplicatedEngine",
    "RolloutBatch",
    "RolloutConfig",
    "RolloutEngine",
]

_LAZY = {
    "RolloutEngine": "megatron_dispo.rollout.engine",
    "ReplicaError": "megatron_dispo.rollout.replicas",
    "ReplicatedEngine": "megatron_dispo.rollout.replicas",
}


def __getattr__(name: str) -> Any:
    """The engine classes import their modules (and, when an engine starts, vLLM) only on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
