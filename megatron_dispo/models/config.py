"""Config dataclasses of the model component: the parallel layout and the optimizer's hyper-parameters.

Plain, validated dataclasses with no torch or Megatron import, so that ``megatron_dispo.config`` can assemble the run's
config tree (and a YAML file can be checked) without importing the training stack. :mod:`.parallel` and
:mod:`.optimizer` act on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["OptimizerSettings", "ParallelConfig"]


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is split over ranks. DP is what is left: world_size / (TP * PP) (experts: / (EP * ETP * PP))."""

    tensor_model_parallel_size: int = 1
    """Tensor parallelism (TP): attention heads, MLP columns/rows and the vocabulary are split over this many ranks."""
    expert_model_parallel_size: int = 1
    """Expert parallelism (EP): the MoE experts are distributed over this many ranks."""
    expert_tensor_parallel_size: int | None = None
    """Tensor parallelism inside each expert; None -> same as tensor_model_parallel_size (Megatron's default)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline parallelism (PP): transformer layers are split into this many consecutive stages."""
    sequence_parallel: bool = False
    """Sequence parallelism (SP): activations outside attention/MLP are split along the sequence over TP.
    Megatron requires it for MoE layers with TP > 1 in training; it has no effect at TP = 1."""
    use_distributed_optimizer: bool = False
    """Shard the optimizer state (and fp32 main params) over the data-parallel ranks (ZeRO-1)."""

    def __post_init__(self) -> None:
        for name in (
            "tensor_model_parallel_size",
            "expert_model_parallel_size",
            "pipeline_model_parallel_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1.")
        etp = self.expert_tensor_parallel_size
        if etp is not None and (not isinstance(etp, int) or isinstance(etp, bool) or etp < 1):
            raise ValueError(f"expert_tensor_parallel_size={etp!r} must be None (same as TP) or an integer >= 1.")

    @property
    def expert_tensor_size(self) -> int:
        """Effective expert tensor-parallel size (resolves None to the TP size)."""
        if self.expert_tensor_parallel_size is None:
            return self.tensor_model_parallel_size
        return self.expert_tensor_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel size of the dense part: world_size / (TP * PP)."""
        return world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)

    def validate(
        self,
        world_size: int,
        *,
        num_attention_heads: int | None = None,
        num_query_groups: int | None = None,
        num_experts: int | None = None,
        num_layers: int | None = None,
    ) -> None:
        """Raise ``ValueError`` naming the fields, their values and the fix if this layout cannot run.

        Checks the world size against TP*PP and EP*ETP*PP, heads and KV heads against TP, experts against EP.
        """
        tp, pp, ep, etp = (
            self.tensor_model_parallel_size,
            self.pipeline_model_parallel_size,
            self.expert_model_parallel_size,
            self.expert_tensor_size,
        )
        if world_size < 1:
            raise ValueError(f"world_size={world_size} must be >= 1.")
        if world_size % (tp * pp) != 0:
            raise ValueError(
                f"world_size ({world_size}) must be a multiple of tensor_model_parallel_size ({tp}) x "
                f"pipeline_model_parallel_size ({pp}) = {tp * pp}; launch a multiple of {tp * pp} ranks or lower TP/PP."
            )
        if world_size % (ep * etp * pp) != 0:
            raise ValueError(
                f"world_size ({world_size}) must be a multiple of expert_model_parallel_size ({ep}) x "
                f"expert_tensor_parallel_size ({etp}) x pipeline_model_parallel_size ({pp}) = {ep * etp * pp}; "
                f"launch a multiple of {ep * etp * pp} ranks or lower EP/expert TP."
            )
        if num_attention_heads is not None and num_attention_heads % tp != 0:
            raise ValueError(
                f"num_attention_heads ({num_attention_heads}) must be a multiple of tensor_model_parallel_size ({tp}); "
                f"use a TP size that divides {num_attention_heads}."
            )
        if num_query_groups is not None and num_query_groups % tp != 0:
            raise ValueError(
                f"num_key_value_heads / num_query_groups ({num_query_groups}) must be a multiple of "
                f"tensor_model_parallel_size ({tp}) (each TP rank owns whole KV heads); use a TP size that divides "
                f"{num_query_groups}."
            )
        if num_experts is not None and num_experts > 0 and num_experts % ep != 0:
            raise ValueError(
                f"num_experts ({num_experts}) must be a multiple of expert_model_parallel_size ({ep}); "
                f"use an EP size that divides {num_experts}."
            )
        if num_experts == 0 and ep > 1:
            raise ValueError(
                f"expert_model_parallel_size={ep} needs a MoE model, but the model is dense (num_experts=0); set "
                "expert_model_parallel_size=1."
            )
        if num_experts is not None and num_experts > 0 and tp > 1 and not self.sequence_parallel:
            raise ValueError(
                f"a MoE model (num_experts={num_experts}) with tensor_model_parallel_size={tp} needs "
                "sequence_parallel=True (Megatron's MoE layer requires it in training); set sequence_parallel=True."
            )
        if num_layers is not None and num_layers % pp != 0:
            raise ValueError(
                f"num_layers ({num_layers}) must be a multiple of pipeline_model_parallel_size ({pp}); "
                f"use a PP size that divides {num_layers}."
            )
        if self.sequence_parallel and tp == 1:
            raise ValueError(
                "sequence_parallel=True needs tensor_model_parallel_size > 1 (it splits activations over TP); "
                "set sequence_parallel=False at TP=1."
            )


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW hyper-parameters (paper defaults)."""

    lr: float = 1e-6
    """Learning rate (constant; the paper uses no warm-up or decay)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-15
    """AdamW epsilon; tiny so that small-gradient coordinates still move at lr 1e-6."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW), not applied to norm weights / 1-D params."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables clipping."""
    grad_reduce_in_fp32: bool = True
    """Accumulate and reduce gradients in fp32 even for bf16 params (DDP main_grad buffers)."""

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr} must be a positive finite number; the paper uses 1e-6.")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value} must be in [0, 1); the paper uses (0.9, 0.95).")
        if self.adam_eps <= 0:
            raise ValueError(f"adam_eps={self.adam_eps} must be positive; the paper uses 1e-15.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0; the paper uses 0.1.")
        if self.clip_grad < 0:
            raise ValueError(f"clip_grad={self.clip_grad} must be >= 0 (0 disables clipping); the paper uses 1.0.")


MoeRoutingReplay = Literal["none", "rollout"]


@dataclass(frozen=True)
class RoutingReplayConfig:
    """Model-side R3 switch; the trainer owner mirrors it as ``config.ModelConfig.moe_routing_replay``."""

    moe_routing_replay: MoeRoutingReplay = "none"
    """``none``: the trainer routes every token itself. ``rollout``: replay the experts the rollout engine chose for
    each token (needs ``RolloutConfig.capture_routed_experts=True`` and a MoE model)."""

    def __post_init__(self) -> None:
        if self.moe_routing_replay not in ("none", "rollout"):
            raise ValueError(f"moe_routing_replay={self.moe_routing_replay!r} must be 'none' or 'rollout'.")

    @property
    def enabled(self) -> bool:
        return self.moe_routing_replay == "rollout"

    def check_model(self, hf_config: Any) -> None:
        """Raise for ``rollout`` on a model without MoE layers (nothing to replay)."""
        if self.enabled and not int(getattr(hf_config, "num_experts", 0) or 0):
            model_type = getattr(hf_config, "model_type", "?")
            raise ValueError(
                f"moe_routing_replay='rollout' needs a MoE model but model_type={model_type!r} has no experts; "
                "set model.moe_routing_replay='none'."
            )
