"""Parallel layout of the policy (TP, EP, expert TP, PP, SP, DP) and Megatron-Core's process-group set-up.

The layout is one frozen :class:`~megatron_dispo.models.config.ParallelConfig`; its ``validate`` rejects impossible
layouts with the field names, their values and the fix before any process group exists. :func:`initialize_parallel` is
the only place that starts ``torch.distributed`` (from the torchrun environment) and Megatron's ``parallel_state``; on
a machine without CUDA it also installs the CPU compatibility layer (:mod:`megatron_dispo.models.cpu_compat`), so
callers never need to.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_dispo.models import cpu_compat
from megatron_dispo.models.config import ParallelConfig

__all__ = [
    "ParallelConfig",
    "destroy_parallel",
    "gather_full",
    "global_param_name",
    "initialize_parallel",
    "is_expert_param",
    "parallel_seed",
    "pipeline_layer_offset",
    "shard_of_full",
    "tensor_parallel_coords",
]


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def initialize_parallel(config: ParallelConfig, *, seed: int = 1234, timeout_minutes: int = 30) -> None:
    """Start torch.distributed (torchrun env), Megatron parallel_state and the model-parallel RNG seeds.

    Uses NCCL with one GPU per local rank when CUDA is available, gloo on CPU (where the CPU compatibility layer is
    installed first). A single process without torchrun variables runs as a world of one. Safe to call again with the
    same layout; a different layout needs :func:`destroy_parallel` first.
    """
    from megatron.core import parallel_state, tensor_parallel

    if not torch.cuda.is_available():
        cpu_compat.activate()
    elif not cpu_compat.has_fused_norm():
        # GPU without Transformer Engine / Apex (the project's GPU image): Megatron falls back to the torch norm,
        # which refuses sequence parallelism; only that patch is needed there.
        cpu_compat.activate(disable=tuple(name for name in cpu_compat.PATCH_NAMES if name != "sp_norm"), force=True)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=_backend(), timeout=timedelta(minutes=timeout_minutes))
    world_size = dist.get_world_size()
    config.validate(world_size)
    if parallel_state.model_parallel_is_initialized():
        same = (
            parallel_state.get_tensor_model_parallel_world_size() == config.tensor_model_parallel_size
            and parallel_state.get_pipeline_model_parallel_world_size() == config.pipeline_model_parallel_size
            and parallel_state.get_expert_model_parallel_world_size() == config.expert_model_parallel_size
            and parallel_state.get_expert_tensor_parallel_world_size() == config.expert_tensor_size
        )
        if not same:
            raise ValueError(
                f"parallel state is already initialised with a different layout than {config}; call "
                "destroy_parallel() before initialize_parallel() with a new layout."
            )
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=config.tensor_model_parallel_size,
            pipeline_model_parallel_size=config.pipeline_model_parallel_size,
            expert_model_parallel_size=config.expert_model_parallel_size,
            expert_tensor_parallel_size=config.expert_tensor_parallel_size,
            distributed_timeout_minutes=timeout_minutes,
        )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    _SEED[0] = seed


_SEED: list[int] = [1234]
"""Seed of the last initialize_parallel() call; build_model() derives the layout-independent weight init from it."""


def parallel_seed() -> int:
    """Seed given to the last :func:`initialize_parallel` call (default 1234)."""
    return _SEED[0]


def destroy_parallel() -> None:
    """Tear down Megatron's parallel state and the default process group (the compat layer is kept installed)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# --- which slice of a full (TP=1, EP=1) tensor a rank holds -----------------------------------------------------------

_EXPERT_MARKER = ".mlp.experts.local_experts."
_LAYER_PREFIX = "decoder.layers."


def is_expert_param(name: str) -> bool:
    """Whether a Megatron parameter name belongs to a routed expert (sharded by EP and expert TP, not TP)."""
    return _EXPERT_MARKER in name


def global_param_name(name: str, num_experts: int | None = None, layer_offset: int = 0) -> str:
    """Layout-independent name: strips DDP's ``module.`` prefixes, makes layer and expert indices global.

    ``decoder.layers.{i}`` of a pipeline stage is global layer ``layer_offset + i`` (Megatron's
    ``get_transformer_layer_offset``); expert ``local_experts.{j}`` on EP rank ``r`` is global expert
    ``r * num_experts / EP + j``; ``num_experts`` (the model's total) is required for expert parameters.
    """
    from megatron.core import parallel_state

    while name.startswith("module."):
        name = name[len("module.") :]
    if layer_offset and name.startswith(_LAYER_PREFIX):
        index, rest = name[len(_LAYER_PREFIX) :].split(".", 1)
        name = f"{_LAYER_PREFIX}{int(index) + layer_offset}.{rest}"
    if not is_expert_param(name):
        return name
    if num_experts is None:
        raise ValueError(f"{name!r} is an expert parameter: pass num_experts (the model's total) to number it.")
    ep_size = parallel_state.get_expert_model_parallel_world_size()
    head, tail = name.split(_EXPERT_MARKER, 1)
    local_index, rest = tail.split(".", 1)
    global_index = parallel_state.get_expert_model_parallel_rank() * (num_experts // ep_size) + int(local_index)
    return f"{head}{_EXPERT_MARKER}{global_index}.{rest}"


def pipeline_layer_offset(config: object) -> int:
    """Global index of this pipeline stage's first transformer layer (0 without PP)."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    return int(get_transformer_layer_offset(config))


def tensor_parallel_coords(name: str) -> tuple[int, int, dist.ProcessGroup | None]:
    """(rank, size, group) of the tensor-parallel group that splits this parameter (expert TP for experts)."""
    from megatron.core import parallel_state

    if is_expert_param(name):
        return (
            parallel_state.get_expert_tensor_parallel_rank(),
            parallel_state.get_expert_tensor_parallel_world_size(),
            parallel_state.get_expert_tensor_parallel_group(),
        )
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_group(),
    )


def _split_layout(param: torch.Tensor) -> tuple[int, int] | None:
    """(partition_dim, stride) of a TP-split parameter, None when it is replicated over TP."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    return int(param.partition_dim), int(getattr(param, "partition_stride", 1))


def shard_of_full(name: str, param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's slice of the full tensor ``full`` for parameter ``name`` (strided for fused GLU weights)."""
    layout = _split_layout(param)
    rank, size, _ = tensor_parallel_coords(name)
    if layout is None or size == 1:
        return full
    dim, stride = layout
    chunks = torch.chunk(full, size * stride, dim=dim)
    return torch.cat(chunks[rank::size], dim=dim)


def gather_full(name: str, param: torch.Tensor, local: torch.Tensor | None = None) -> torch.Tensor:
    """Full (TP=1) tensor of ``local`` (default: the parameter's data), all-gathered over its TP group.

    Inverse of :func:`shard_of_full`; every rank of the TP group gets the result.
    """
    local = param.detach() if local is None else local.detach()
    layout = _split_layout(param)
    rank, size, group = tensor_parallel_coords(name)
    del rank
    if layout is None or size == 1:
        return local.clone()
    dim, stride = layout
    shards = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(shards, local.contiguous(), group=group)
    per_rank = [torch.chunk(shard, stride, dim=dim) for shard in shards]
    return torch.cat([per_rank[r][s] for s in range(stride) for r in range(size)], dim=dim)
