"""Megatron DDP wrapping, the Megatron AdamW optimizer (optionally distributed) and one optimizer step.

The hyper-parameters (:class:`~megatron_dispo.models.config.OptimizerSettings`) default to the paper's (DISPO, arXiv
2602.00983, training set-up): AdamW with lr 1e-6, betas (0.9, 0.95), eps 1e-15, weight decay 0.1 (not on norms / 1-D
params, Megatron's rule), gradient-norm clipping at 1.0. One step is ``finalize_model_grads`` (DP all-reduce or
reduce-scatter, SP norm and qk-layernorm grads over TP, expert grads over expert-DP) followed by the optimizer step,
see :func:`finalize_and_step`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from megatron_dispo.models.config import OptimizerSettings, ParallelConfig

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import MegatronOptimizer

__all__ = ["OptimizerSettings", "StepResult", "build_optimizer", "finalize_and_step", "wrap_ddp", "zero_grads"]


@dataclass(frozen=True)
class StepResult:
    """Outcome of one optimizer step."""

    grad_norm: float
    """Global L2 norm of the gradients before clipping (over all DP/TP/EP/PP ranks)."""
    updated: bool
    """False when the step was skipped (inf/nan gradients with a loss scaler)."""


def wrap_ddp(
    model: torch.nn.Module,
    parallel: ParallelConfig,
    settings: OptimizerSettings | None = None,
    *,
    overlap_grad_reduce: bool = False,
    bucket_size: int | None = None,
) -> DistributedDataParallel:
    """Wrap a GPTModel in Megatron DDP (contiguous fp32 grad buffers; needed for TP/EP/SP gradient reductions)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    settings = settings or OptimizerSettings()
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=settings.grad_reduce_in_fp32,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        bucket_size=bucket_size,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_optimizer(
    model_chunks: list[DistributedDataParallel],
    parallel: ParallelConfig,
    settings: OptimizerSettings | None = None,
) -> MegatronOptimizer:
    """Megatron AdamW over the DDP-wrapped chunks (separate dense / expert param groups, as Megatron builds them)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    settings = settings or OptimizerSettings()
    if not model_chunks:
        raise ValueError("model_chunks is empty; pass [wrap_ddp(model, parallel)].")
    ddp_distributed = model_chunks[0].ddp_config.use_distributed_optimizer
    if ddp_distributed != parallel.use_distributed_optimizer:
        raise ValueError(
            f"the DDP wrapper has use_distributed_optimizer={ddp_distributed} but parallel.use_distributed_optimizer="
            f"{parallel.use_distributed_optimizer}; wrap the model with wrap_ddp(model, parallel) using this config."
        )
    model_config = model_chunks[0].config
    config = OptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        min_lr=settings.lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_eps,
        decoupled_weight_decay=True,
        clip_grad=settings.clip_grad,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        bf16=model_config.bf16,
        fp16=model_config.fp16,
        params_dtype=model_config.params_dtype,
    )
    return get_megatron_optimizer(config, model_chunks)


def zero_grads(model_chunks: list[DistributedDataParallel], optimizer: MegatronOptimizer) -> None:
    """Clear the DDP grad buffers and the optimizer's grads before the first micro-batch of a step."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()


def finalize_and_step(
    model_chunks: list[DistributedDataParallel],
    optimizer: MegatronOptimizer,
    *,
    num_tokens: torch.Tensor | None = None,
) -> StepResult:
    """Reduce the accumulated grads (``finalize_model_grads``) and step; returns the pre-clip global grad norm.

    ``num_tokens``: if given, grads are divided by its sum over DP (Megatron's per-token loss mode); the DISPO loss
    already divides by the global token count, so the trainer passes None.
    """
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(model_chunks, num_tokens=num_tokens)
    updated, grad_norm, _num_zeros = optimizer.step()
    return StepResult(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"), updated=bool(updated))
