"""megatron_dispo.rollout: the vLLM rollout engine (grouped sampling, scoring, live weight updates, loop truncation).

Importing this package (as loading a run config does, for ``RolloutConfig``) imports neither the engine nor vLLM and
changes no environment variable: ``RolloutEngine`` is imported on first use, and vLLM only when an engine starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from megatron_dispo.rollout.batch import FinishReason, RolloutBatch
from megatron_dispo.rollout.config import RolloutConfig

if TYPE_CHECKING:
    from megatron_dispo.rollout.engine import RolloutEngine

__all__ = ["FinishReason", "RolloutBatch", "RolloutConfig", "RolloutEngine"]


def __getattr__(name: str) -> Any:
    """``from megatron_dispo.rollout import RolloutEngine`` imports the engine module only then."""
    if name == "RolloutEngine":
        from megatron_dispo.rollout.engine import RolloutEngine

        return RolloutEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
