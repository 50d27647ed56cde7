"""What a rollout engine asks of vLLM when it starts: the model runner, the launcher world, the device, ``LLM`` kwargs.

Kept apart from :class:`~megatron_dispo.rollout.engine.RolloutEngine` so each choice is a small function with its
reason, checked on CPU by recording what vLLM would be given:

* **runner**: pinned per device (``VLLM_USE_V2_MODEL_RUNNER``), because the two runners take different logits-processor
  classes and vLLM's own choice depends on Triton and feature checks: V2 on GPU (vLLM's default there, and the runner
  whose aux-output connector returns ``enable_return_routed_experts``), V1 on CPU (V2 needs Triton, which has no CPU
  backend).
* **world and device**: every GPU engine (and every engine of TP > 1) starts under ``external_launcher`` in its
  replica's private world (:func:`~megatron_dispo.rollout.replica_world.replica_world`), which takes the device from
  ``LOCAL_RANK``; the uniproc executor would put a TP = 1 engine on ``cuda:0`` whatever the rank. vLLM's worker then
  calls ``set_device``, so the trainer's current device is put back afterwards (:func:`keep_current_device`).
* **CUDA graphs**: ``rollout.enforce_eager`` defaults to eager on CPU only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from megatron_dispo.rollout.config import RolloutConfig
from megatron_dispo.rollout.placement import ReplicaPlacement
from megatron_dispo.rollout.replica_world import free_port

__all__ = ["keep_current_device", "launcher_placement", "llm_kwargs", "model_runner", "startup_env"]

IN_PROCESS_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"

ModelRunner = Literal["v1", "v2"]


def model_runner(device: str) -> ModelRunner:
    """The vLLM model runner the engine pins on ``device`` (see the module docstring for why)."""
    return "v2" if device == "cuda" else "v1"


@contextlib.contextmanager
def startup_env(device: str) -> Iterator[None]:
    """While vLLM starts: the engine core in this process (repetition hits come back through the processor's dict,
    weights are reloaded in place) and the runner pinned; both variables restored afterwards."""
    wanted = {IN_PROCESS_ENV: "0", RUNNER_ENV: "1" if model_runner(device) == "v2" else "0"}
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ |= wanted
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def launcher_placement(config: RolloutConfig, device: str, replica: ReplicaPlacement | None) -> ReplicaPlacement | None:
    """The placement to start vLLM's ``external_launcher`` in, or None for a CPU TP = 1 engine (uniproc, private world).

    A TP = 1 replica is a world of one rank: it needs a port of its own but no exchange with other ranks.
    """
    if device != "cuda" and config.tensor_parallel_size == 1:
        return None
    placement = replica or ReplicaPlacement(rank=0, replica_index=0, num_replicas=1, ranks=(0,))
    if placement.master_port is None and placement.tensor_parallel_size == 1:
        placement = dataclasses.replace(placement, master_port=free_port())
    return placement


@contextlib.contextmanager
def keep_current_device(device: str) -> Iterator[None]:
    """vLLM's GPU worker calls ``set_device`` on the engine's device: put the trainer's current device back after."""
    if device != "cuda" or not torch.cuda.is_available():
        yield
        return
    current = torch.cuda.current_device()
    try:
        yield
    finally:
        torch.cuda.set_device(current)


def llm_kwargs(
    config: RolloutConfig,
    device: str,
    *,
    weights_dir: Path,
    tokenizer_dir: Path,
    logits_processor: type,
    launcher: bool,
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for this engine."""
    kwargs: dict[str, Any] = {
        "model": str(weights_dir),
        "tokenizer": str(tokenizer_dir),
        "dtype": config.dtype,
        "seed": config.seed,
        "max_model_len": config.max_model_len,
        "max_num_seqs": config.max_num_seqs,
        "enforce_eager": config.eager(device),
        "enable_prefix_caching": config.enable_prefix_caching,
        "logprobs_mode": "processed_logprobs",  # log-probs under the sampling distribution (temperature, top-p)
        "logits_processors": [logits_processor],
    }
    if launcher:
        kwargs |= {
            "tensor_parallel_size": config.tensor_parallel_size,
            "distributed_executor_backend": "external_launcher",
        }
        if config.tensor_parallel_size > 1:
            kwargs["enable_expert_parallel"] = config.expert_parallel
    if device == "cuda":
        kwargs |= {"gpu_memory_utilization": config.gpu_memory_utilization, "enable_sleep_mode": True}
        if config.quantization == "fp8":
            kwargs["quantization"] = "fp8"  # the checkpoint's quantization_config must say the same
        if config.capture_routed_experts:  # vLLM's own routed-experts output (Model Runner V2, GPU only)
            kwargs["enable_return_routed_experts"] = True
    else:
        # Seeded requests whose prompt is split by chunked prefill make vLLM rewind the request's generator
        # offset, which CPU generators do not support ("CPU Generator does not use offset"): prefill whole.
        kwargs |= {
            "kv_cache_memory_bytes": config.kv_cache_bytes,
            "enable_chunked_prefill": False,
            "max_num_batched_tokens": max(4096, config.max_model_len),
        }
    return kwargs
