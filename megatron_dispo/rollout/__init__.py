"""megatron_dispo.rollout: the vLLM rollout engine (grouped sampling, scoring, live weight updates, loop truncation).

Importing this package sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (vLLM's engine core runs in this process); vLLM
itself is imported only when an engine starts.
"""

from megatron_dispo.rollout.batch import FinishReason, RolloutBatch
from megatron_dispo.rollout.config import RolloutConfig
from megatron_dispo.rollout.engine import RolloutEngine
from megatron_dispo.rollout.placement import ReplicaPlacement
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
