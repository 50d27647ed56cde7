"""CPU tests for megatron_dispo.refit.transports: the IPC-handle and broadcast serialisation, and transport selection.

The CUDA-IPC payload is built with the same ``reduce_tensor`` on a CPU buffer (shared memory instead of a CUDA handle)
and rebuilt in another process; the NCCL path's code runs unchanged over gloo between two processes.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
from typing import Any

import pytest
import torch

from megatron_dispo.refit.buckets import iter_buckets, pack_bucket
from megatron_dispo.refit.transports import (
    CudaIpcTransport,
    IpcBucketPayload,
    NcclBroadcastTransport,
    TransportUnavailableError,
    rebuild_ipc_bucket,
    receive_broadcast_buckets,
    resolve_transport,
    serialize_ipc_bucket,
)
from tests.models.distributed import run_workers

NUM_GPUS = 0


def _named_tensors(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        ("model.embed_tokens.weight", torch.randn(64, 16, generator=generator)),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(32, 16, generator=generator).to(torch.bfloat16)),
        ("model.layers.0.input_layernorm.weight", torch.randn(16, generator=generator)),
        ("model.layers.0.mlp.down_proj.weight", (torch.randn(16, 48, generator=generator)).to(torch.float8_e4m3fn)),
        ("lm_head.weight", torch.randn(64, 16, generator=generator).to(torch.float16)),
    ]


def _digests(named: list[tuple[str, torch.Tensor]]) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    out = {}
    for name, tensor in named:
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out[name] = (hashlib.sha256(raw).hexdigest(), str(tensor.dtype), tuple(tensor.shape))
    return out


def _receive_ipc(queue: Any, results: Any) -> None:  # pragma: no cover - runs in the child
    payload: IpcBucketPayload = queue.get(timeout=60)
    results.put(_digests(rebuild_ipc_bucket(payload)))


def test_ipc_payload_round_trip_in_another_process_gives_identical_tensors() -> None:
    named = _named_tensors()
    packed = pack_bucket(named)
    payload = serialize_ipc_bucket(packed)
    assert payload.layout.names == [name for name, _ in named]
    ctx = mp.get_context("spawn")
    queue, results = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_receive_ipc, args=(queue, results), daemon=True)
    child.start()
    try:
        queue.put(payload)  # pickled by ForkingPickler: the buffer travels as a shared-memory handle
        received = results.get(timeout=120)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    assert received == _digests(named)


def _broadcast_worker(bucket_bytes: int) -> dict[str, Any]:  # pragma: no cover - runs in the workers
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    group = dist.group.WORLD
    if rank == 0:
        transport = NcclBroadcastTransport(group, src=0)
        counters = transport.transfer(iter_buckets(_named_tensors(), bucket_bytes))
        return {"sent": _digests(_named_tensors()), "buckets": counters.num_buckets, "bytes": counters.payload_bytes}
    received: list[tuple[str, torch.Tensor]] = []
    sizes = []
    for bucket in receive_broadcast_buckets(group, src=0):
        sizes.append(len(bucket))
        received.extend((name, tensor.clone()) for name, tensor in bucket)
    return {"received": _digests(received), "bucket_sizes": sizes}


def test_broadcast_transport_over_gloo_delivers_identical_buckets() -> None:
    sender, receiver = run_workers(_broadcast_worker, 2, timeout_s=120, args=(4096,))
    assert receiver["received"] == sender["sent"]
    # 4096 B cap: embed (64x16 fp32 = 4096 B) fills one; q_proj 1024 + norm 64 + down 768 + lm_head 2048 = 3904 B
    assert sender["buckets"] == 2 and receiver["bucket_sizes"] == [1, 4]
    assert sender["bytes"] == sum(t.numel() * t.element_size() for _, t in _named_tensors())


def test_auto_selection_table() -> None:
    def pick(**kwargs: bool) -> str:
        base = {"has_engine": True, "has_rpc": True, "has_group": False, "cuda_available": False}
        return resolve_transport("auto", **(base | kwargs))

    assert pick() == "colocated"  # CPU: always in-process
    assert pick(cuda_available=True) == "colocated"  # GPU, engine object in this process (its RPC exists too)
    assert pick(cuda_available=True, has_engine=False) == "cuda_ipc"  # GPU, engine workers reachable only by RPC
    assert pick(cuda_available=True, has_engine=False, has_group=True) == "nccl"  # GPU, separate engine ranks
    assert pick(cuda_available=True, has_rpc=False) == "colocated"
    with pytest.raises(TransportUnavailableError, match="no way to reach the engine"):
        pick(has_engine=False)


def test_unavailable_transports_raise_clear_errors() -> None:
    common = {"has_engine": True, "has_rpc": True, "has_group": False}
    with pytest.raises(TransportUnavailableError, match="needs CUDA"):
        resolve_transport("cuda_ipc", cuda_available=False, **common)
    with pytest.raises(TransportUnavailableError, match="process group"):
        resolve_transport("nccl", cuda_available=True, **common)
    with pytest.raises(TransportUnavailableError, match="update_weights"):
        resolve_transport("colocated", cuda_available=False, has_engine=False, has_rpc=False, has_group=False)
    if not torch.cuda.is_available():
        with pytest.raises(TransportUnavailableError, match="needs CUDA"):
            CudaIpcTransport(rpc=lambda *args: [], reset_prefix_cache=lambda: None)
    if "RANK" not in os.environ:
        with pytest.raises(TransportUnavailableError, match="process group"):
            NcclBroadcastTransport(None, src=0)
