"""One in-place reload session on a vLLM worker (``LLM.collective_rpc(fn, args=...)`` runs ``fn(worker, *args)``).

vLLM's ``reload_weights`` opens a layer-wise reload over the *whole* model, loads what it is given and re-processes
every layer (``model_loader.reload.inplace``): called once per bucket it repeats that work per bucket. A refit
therefore opens one session (:func:`begin_reload`), feeds every bucket (:func:`load_tensors`; a fused q/k/v or gate/up
layer is buffered until all of its weights arrived) and closes it once (:func:`finish_reload`). Both the in-process
engine (``rollout/engine.py``) and the CUDA-IPC receiver (``refit/vllm_worker.py``) run these.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["begin_reload", "finish_reload", "load_tensors"]


def _model(worker: Any) -> torch.nn.Module:
    return worker.model_runner.get_model()


def begin_reload(worker: Any) -> None:
    """Open a layer-wise reload session on the worker's model (vLLM ``initialize_layerwise_reload``)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

    with set_current_vllm_config(worker.vllm_config):
        initialize_layerwise_reload(_model(worker))


def load_tensors(worker: Any, named_tensors: Iterable[tuple[str, Tensor]]) -> int:
    """Feed HF-named checkpoint-format tensors to the model's own ``load_weights``; return how many were given."""
    from vllm.config import set_current_vllm_config

    tensors = list(named_tensors)
    with set_current_vllm_config(worker.vllm_config), torch.no_grad():
        _model(worker).load_weights(iter(tensors))
    return len(tensors)


def finish_reload(worker: Any) -> None:
    """Close the session: process layers (requantise, repack) and drop caches derived from the old weights."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

    with set_current_vllm_config(worker.vllm_config):
        finalize_layerwise_reload(_model(worker), worker.vllm_config.model_config)
    runner = worker.model_runner
    for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
        if callable(getattr(runner, reset, None)):
            getattr(runner, reset)()
