"""Parallel layout of the policy (TP, EP, expert TP, PP, SP, DP) and Megatron-Core's process-group set-up.

The layout is one frozen :class:`~megatron_dispo.models.config.ParallelConfig`; its ``validate`` rejects impossible
layouts with the field names, their values and the fix before any process group exists. :func:`initialize_parallel` is
the only place that starts ``torch.distributed`` (from the torchrun environment) and Megatron's ``parallel_state``; on
a machine without CUDA it also installs the CPU compatibility layer (:mod:`megatron_dispo.models.cpu_compat`), so
callers never need to.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_dispo.models import cpu_compat
from megatron_dispo.models.config import ParallelConfig
from megatron_dispo.models.mapping import TPSplit, shard_tensor, unshard_tensors

__all__ = [
    "ParallelConfig",
    "destroy_parallel",
    "ensure_process_group_env",
    "free_port",
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


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a rendezvous nobody else joins)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_process_group_env() -> None:
    """Give a process started without torchrun the variables torchrun would set, so it takes the same ``env://`` path.

    A lone process becomes rank 0 of a world of 1 on 127.0.0.1 with a free port (a fixed port would collide between
    two single-process runs on one machine). Variables already set (torchrun, Slurm scripts) are kept.
    """
    if dist.is_initialized():
        return
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(name, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())


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
        ensure_process_group_env()
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
    _register_groups(timeout_minutes)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


_HOST_GROUPS: dict[str, dist.ProcessGroup] = {}


def _register_groups(timeout_minutes: int) -> None:
    """Name every group by purpose: Megatron's model-parallel groups carry model tensors (``device``: NCCL on GPU);
    its gloo data-parallel group and a gloo mirror of the pipeline group carry host data (metrics, manifests)."""
    from megatron.core import parallel_state as ps

    from megatron_dispo.comm.groups import host_mirror, init_host_world, register_group

    timeout = timedelta(minutes=timeout_minutes)
    init_host_world(timeout)
    for name, get in (
        ("tp", ps.get_tensor_model_parallel_group),
        ("pp", ps.get_pipeline_model_parallel_group),
        ("dp", ps.get_data_parallel_group),
        ("ep", ps.get_expert_model_parallel_group),
        ("mp", ps.get_model_parallel_group),
    ):
        register_group(get(), "device", name)
    if "dp" not in _HOST_GROUPS:
        _HOST_GROUPS["dp"] = register_group(ps.get_data_parallel_group_gloo(), "host", "host-dp")
        pp_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
        _HOST_GROUPS["pp"] = host_mirror(pp_ranks, "host-pp", timeout)


def host_group(name: str) -> dist.ProcessGroup:
    """This rank's host (gloo) ``dp`` or ``pp`` group, for CPU tensors and objects beside the model's groups."""
    if name not in _HOST_GROUPS:
        raise RuntimeError(f"no host group {name!r}: initialize_parallel() first (known: dp, pp).")
    return _HOST_GROUPS[name]


def parallel_seed() -> int:
    """Seed given to the last :func:`initialize_parallel`; ``build_model`` draws its layout-independent init from it.

    Read back from Megatron's RNG tracker, which holds the seeded streams, so no copy of run state lives in this
    module: ``model_parallel_cuda_manual_seed(seed)`` registers ``seed`` itself for the data-parallel stream and
    ``seed`` plus positive offsets for the tensor- and expert-parallel streams, so the smallest seed is the one given.
    """
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    seeds = getattr(get_cuda_rng_tracker(), "seeds_", None)
    if not seeds:
        raise RuntimeError(
            "Megatron's RNG tracker holds no seed yet: call initialize_parallel(config, seed=...) first, or pass "
            "seed=... to build_model()."
        )
    return int(min(seeds))


def destroy_parallel() -> None:
    """Tear down Megatron's parallel state and the default process group (the compat layer is kept installed)."""
    from megatron.core import parallel_state

    from megatron_dispo.comm.groups import forget_groups

    parallel_state.destroy_model_parallel()
    _HOST_GROUPS.clear()
    forget_groups()
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


_SPLIT_OF_LAYOUT: dict[tuple[int, int], TPSplit] = {(0, 1): "column", (1, 1): "row", (0, 2): "gated_column"}
"""Megatron's (partition_dim, partition_stride) tags -> the mapping table's TP split; stride 2 is a fused GLU weight,
whose rank shard is [gate_r; up_r]."""


def _tp_split(name: str, param: torch.Tensor) -> TPSplit:
    """How ``param`` is split over TP, read from Megatron's tags on it ("replicated" when it is not split)."""
    if not getattr(param, "tensor_model_parallel", False):
        return "replicated"
    layout = (int(param.partition_dim), int(getattr(param, "partition_stride", 1)))
    if layout not in _SPLIT_OF_LAYOUT:
        raise ValueError(f"{name}: TP layout (partition_dim, stride)={layout} is not one of {list(_SPLIT_OF_LAYOUT)}.")
    return _SPLIT_OF_LAYOUT[layout]


def shard_of_full(name: str, param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's slice of the full tensor ``full`` for parameter ``name`` (:func:`~.mapping.shard_tensor`)."""
    rank, size, _ = tensor_parallel_coords(name)
    return full if size == 1 else shard_tensor(full, _tp_split(name, param), rank, size)


def gather_full(name: str, param: torch.Tensor, local: torch.Tensor | None = None) -> torch.Tensor:
    """Full (TP=1) tensor of ``local`` (default: the parameter's data), all-gathered over its TP group.

    Inverse of :func:`shard_of_full` (:func:`~.mapping.unshard_tensors`); every rank of the TP group gets the result.
    """
    local = param.detach() if local is None else local.detach()
    _, size, group = tensor_parallel_coords(name)
    split = _tp_split(name, param) if size > 1 else "replicated"
    if split == "replicated":
        return local.clone()
    shards = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(shards, local.contiguous(), group=group)
    return unshard_tensors(shards, split)
