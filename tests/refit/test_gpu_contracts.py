"""What the refit asks of a GPU engine, checked on CPU (issue 24): the transport ``auto`` picks, and the calls of a
CUDA-IPC refit (packed on CPU buffers, as the engine-in-this-process test path allows)."""

from __future__ import annotations

from typing import Any

import torch

from megatron_dispo.refit.transports import CudaIpcTransport, resolve_transport

NUM_GPUS = 0


def test_gpu_contract_auto_transport_is_colocated_for_an_in_process_engine() -> None:
    """vLLM's collective_rpc exists on every engine, so RPC says nothing about where the workers run; a CUDA-IPC
    handle cannot be opened by the process that made it. An engine object here means colocated."""
    picked = resolve_transport("auto", has_engine=True, has_rpc=True, has_group=False, cuda_available=True)
    assert picked == "colocated"
    assert resolve_transport("auto", has_engine=False, has_rpc=True, has_group=False, cuda_available=True) == "cuda_ipc"


def test_gpu_contract_cuda_ipc_refit_is_one_session_then_a_prefix_cache_reset() -> None:
    """The engine's cached KV blocks were computed with the old weights: the IPC refit resets them after the session."""
    calls: list[str] = []

    def rpc(fn: Any, *args: Any) -> list[Any]:
        calls.append(fn.__name__)
        return [None]

    transport = CudaIpcTransport(rpc, reset_prefix_cache=lambda: calls.append("reset_prefix_cache"), device="cpu")
    buckets = [[("a.weight", torch.ones(2, 2))], [("b.weight", torch.zeros(3))]]
    counters = transport.transfer(iter(buckets))
    assert counters.num_buckets == 2
    assert calls == ["begin_reload", "load_ipc_bucket", "load_ipc_bucket", "finish_reload", "reset_prefix_cache"]
