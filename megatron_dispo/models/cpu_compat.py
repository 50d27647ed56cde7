"""Scoped compatibility layer that lets Megatron-Core 0.16.1 train on CPU over gloo (tests, CPU demo).

Megatron-Core assumes CUDA in nine places on the path this project uses (platform-facts, "Megatron-Core 0.16.1 on
CPU"). Each is one :class:`CompatPatch` below, with the failure it fixes and a probe test in
``tests/models/test_cpu_compat.py`` that disables just that patch and asserts the documented failure still happens, so
after a Megatron upgrade the failing probe names the patch to drop.

Scoping: patches never touch ``torch`` itself for the whole process. The device patches replace the name ``torch``
inside Megatron's own modules with :class:`MegatronTorchView`, a read-through view of ``torch`` that answers the
CUDA-only calls for the CPU; the other patches replace single Megatron attributes. ``param.type()`` (patch 4) is a
tensor method, so it is rewritten only while the distributed optimizer builds its parameter groups. Everything is
restored by :func:`deactivate`. :func:`activate` is a no-op when CUDA is available (the real code paths run there).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "PATCHES",
    "CompatPatch",
    "MegatronTorchView",
    "activate",
    "active_patches",
    "cpu_compat",
    "deactivate",
    "has_fused_norm",
    "is_active",
]

MEGATRON_PREFIX = "megatron.core"

# Megatron modules on this project's path; imported before patching so their `torch` name can be redirected.
_MEGATRON_MODULES: tuple[str, ...] = (
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.torch_norm",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.moe_layer",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.language_model_embedding",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.serialization",
    # pipeline schedules: device="cuda" token counters (patch 3); p2p buffers on torch.cuda.current_device() (patch 1)
    # and torch.cuda.synchronize() after the shape exchange (patch 5)
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
)

_CPU = torch.device("cpu")


def _to_cpu_device(device: Any) -> Any:
    """Map any CUDA device spec ('cuda', 'cuda:1', torch.device('cuda'), an int index) to the CPU device."""
    if isinstance(device, torch.device):
        return _CPU if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU  # a bare int means cuda:<int> to torch
    return device


class _NoEvent:
    """CPU stand-in for ``torch.cuda.Event``: the work it would mark is already done."""

    def synchronize(self) -> None:
        return None

    def wait(self, stream: Any = None) -> None:
        del stream

    def query(self) -> bool:
        return True


class _NoStream:
    """CPU stand-in for ``torch.cuda.Stream``: CPU kernels run synchronously, so there is nothing to order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs

    def synchronize(self) -> None:
        return None

    def wait_stream(self, stream: Any) -> None:
        del stream

    def record_event(self, event: Any = None) -> Any:
        return event if event is not None else _NoEvent()

    def wait_event(self, event: Any) -> None:
        del event


class _CudaView(types.SimpleNamespace):
    """``torch.cuda`` as Megatron modules see it under the compat layer: CPU answers for the enabled features."""

    def __init__(self, view: MegatronTorchView) -> None:
        super().__init__()
        object.__setattr__(self, "_view", view)

    def __getattr__(self, name: str) -> Any:
        features = self._view.features
        if "current_device" in features and name == "current_device":
            return lambda: _CPU
        if "rng_tracker" in features and name == "manual_seed":
            return torch.manual_seed
        if "rng_tracker" in features and name == "get_rng_state":
            return lambda device=None: torch.get_rng_state()
        if "cuda_stream" in features:
            if name == "Stream":
                return _NoStream
            if name == "Event":
                return _NoEvent
            if name in ("stream", "nvtx_range"):
                return lambda *a, **k: contextlib.nullcontext()
            if name in ("current_stream", "default_stream"):
                return lambda *a, **k: _NoStream()
            if name == "synchronize":
                return lambda *a, **k: None
        return getattr(torch.cuda, name)


_FACTORIES_WITH_DEVICE = frozenset(
    {
        "tensor",
        "as_tensor",
        "zeros",
        "ones",
        "empty",
        "full",
        "arange",
        "rand",
        "randn",
        "randint",
        "zeros_like",
        "ones_like",
        "empty_like",
        "full_like",
        "eye",
        "linspace",
    }
)


class MegatronTorchView(types.ModuleType):
    """Read-through view of ``torch`` installed as the name ``torch`` inside Megatron modules (never globally).

    ``features`` selects which CUDA-only calls are answered for the CPU: ``current_device`` (patch 1), ``rng_tracker``
    (patch 2, CUDA RNG calls go to the CPU generator), ``cuda_factories`` (patch 3, ``device='cuda'`` -> CPU) and
    ``cuda_stream`` (patch 5, streams are no-ops). Everything else is ``torch`` itself.
    """

    def __init__(self, features: set[str]) -> None:
        super().__init__("torch")
        self.features = features
        self.cuda = _CudaView(self)

    def __getattr__(self, name: str) -> Any:
        value = getattr(torch, name)
        if "cuda_factories" in self.features and name in _FACTORIES_WITH_DEVICE:
            return _device_mapped(value)
        return value


def _device_mapped(factory: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(factory)
    def call(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return factory(*args, **kwargs)

    return call


@dataclass(frozen=True)
class CompatPatch:
    """One documented change: what Megatron does on CPU without it, and the probe test that proves it is needed."""

    name: str
    failure: str
    probe_test: str


PATCHES: tuple[CompatPatch, ...] = (
    CompatPatch(
        "current_device",
        "torch.cuda.current_device() in attention, rotary embedding, router, layers: "
        "AssertionError 'Torch not compiled with CUDA enabled'",
        "test_current_device_patch_is_needed",
    ),
    CompatPatch(
        "rng_tracker",
        "get_cuda_rng_tracker().add/fork and model_parallel_cuda_manual_seed read CUDA RNG state: "
        "'Torch not compiled with CUDA enabled'; the CPU generator backs the tracker instead",
        "test_rng_tracker_patch_is_needed",
    ),
    CompatPatch(
        "cuda_factories",
        "hard-coded device='cuda' tensor factories in optimizer, clip_grads, grad scaler, DDP buffers, "
        "dist_checkpointing: 'Torch not compiled with CUDA enabled'",
        "test_cuda_factories_patch_is_needed",
    ),
    CompatPatch(
        "param_type",
        "DistributedOptimizer / Float16Optimizer compare param.type() with 'torch.cuda.FloatTensor' etc.: TypeError "
        "'Wrapped parameters must be one of torch.cuda.FloatTensor, ...'; clip_grad_by_total_norm_fp32 asserts "
        "grad.type() == 'torch.cuda.FloatTensor' (AssertionError) whenever the norm exceeds clip_grad",
        "test_param_type_patch_is_needed",
    ),
    CompatPatch(
        "cuda_stream",
        "MoEAlltoAllTokenDispatcher builds torch.cuda.Stream() even at EP=1: 'Torch not compiled with CUDA enabled'",
        "test_cuda_stream_patch_is_needed",
    ),
    CompatPatch(
        "te_general_gemm",
        "moe_utils.RouterGatingLinearFunction reads te_general_gemm, only defined when Transformer Engine imports: "
        "NameError",
        "test_te_general_gemm_patch_is_needed",
    ),
    CompatPatch(
        "split_sizes",
        "alltoall dispatcher: maybe_move_tensor_to_cpu(as_numpy=True) converts only CUDA tensors, so split sizes "
        "stay tensors and all_to_all_single rejects them (TypeError)",
        "test_split_sizes_patch_is_needed",
    ),
    CompatPatch(
        "sp_norm",
        "sequence parallel (required for MoE with TP>1) with the torch norm fallback: AssertionError "
        "'sequence parallel not supported by torch LayerNorm'; the norm params are tagged sequence_parallel instead "
        "so finalize_model_grads all-reduces their grads across TP",
        "test_sp_norm_patch_is_needed",
    ),
    CompatPatch(
        "gloo_uneven_all_gather",
        "gloo has no all_gather of unequal sizes (TP2 x EP2 alltoall gathers uneven token counts over expert TP): "
        "RuntimeError; pad to the largest split, gather, slice",
        "test_gloo_uneven_all_gather_patch_is_needed",
    ),
)
PATCH_NAMES: tuple[str, ...] = tuple(patch.name for patch in PATCHES)
_VIEW_FEATURES = frozenset({"current_device", "rng_tracker", "cuda_factories", "cuda_stream"})


@dataclass
class _State:
    enabled: frozenset[str] = frozenset()
    restore: list[tuple[Any, str, Any]] | None = None
    view: MegatronTorchView | None = None


_STATE = _State()
_MISSING = object()


def has_fused_norm() -> bool:
    """Whether Megatron's layer specs get a fused norm (Apex or Transformer Engine) instead of the torch fallback."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return gpt_layer_specs.LNImpl is not WrappedTorchNorm


def is_active() -> bool:
    """Whether the compat layer is currently installed."""
    return _STATE.restore is not None


def active_patches() -> frozenset[str]:
    """Names of the installed patches (empty when inactive or when CUDA is available)."""
    return _STATE.enabled


def _set(restore: list[tuple[Any, str, Any]], owner: Any, name: str, value: Any) -> None:
    restore.append((owner, name, owner.__dict__.get(name, _MISSING) if hasattr(owner, "__dict__") else _MISSING))
    setattr(owner, name, value)


def activate(*, disable: tuple[str, ...] | frozenset[str] = (), force: bool = False) -> frozenset[str]:
    """Install the patches (all but ``disable``) if CUDA is absent (or ``force``); return the installed names.

    Idempotent with the same selection. ``disable`` exists for the probe tests; production code never passes it.
    """
    unknown = set(disable) - set(PATCH_NAMES)
    if unknown:
        raise ValueError(f"disable={sorted(unknown)} names no compat patch; known patches: {list(PATCH_NAMES)}.")
    if torch.cuda.is_available() and not force:
        return frozenset()
    enabled = frozenset(PATCH_NAMES) - frozenset(disable)
    if is_active():
        if enabled == _STATE.enabled:
            _redirect_torch(_STATE.restore, _STATE.view)  # Megatron modules imported since the last call
            return enabled
        deactivate()
    for module_name in _MEGATRON_MODULES:
        importlib.import_module(module_name)
    restore: list[tuple[Any, str, Any]] = []
    view = MegatronTorchView(set(enabled & _VIEW_FEATURES))
    _redirect_torch(restore, view)
    if "rng_tracker" in enabled:
        _install_rng(restore)
    if "param_type" in enabled:
        _install_param_type(restore)
    if "te_general_gemm" in enabled:
        _install_te_general_gemm(restore)
    if "split_sizes" in enabled:
        _install_split_sizes(restore)
    if "sp_norm" in enabled:
        _install_sp_norm(restore)
    if "gloo_uneven_all_gather" in enabled:
        _install_uneven_all_gather(restore)
    _STATE.enabled, _STATE.restore, _STATE.view = enabled, restore, view
    return enabled


def _redirect_torch(restore: list[tuple[Any, str, Any]], view: MegatronTorchView | None) -> None:
    """Point the name ``torch`` of every loaded Megatron module that still sees the real torch at ``view``."""
    if view is None:
        return
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith(MEGATRON_PREFIX) and module is not None and module.__dict__.get("torch") is torch:
            _set(restore, module, "torch", view)


def deactivate() -> None:
    """Undo every patch (reverse order), leaving Megatron exactly as imported."""
    if _STATE.restore is None:
        return
    for owner, name, old in reversed(_STATE.restore):
        if old is _MISSING:
            with contextlib.suppress(AttributeError):
                delattr(owner, name)
        else:
            setattr(owner, name, old)
    _STATE.enabled, _STATE.restore, _STATE.view = frozenset(), None, None


@contextlib.contextmanager
def cpu_compat(*, disable: tuple[str, ...] = (), force: bool = False) -> Iterator[frozenset[str]]:
    """Context form of :func:`activate` / :func:`deactivate` (restores the previous selection on exit)."""
    previous = _STATE.enabled if is_active() else None
    installed = activate(disable=disable, force=force)
    try:
        yield installed
    finally:
        deactivate()
        if previous is not None:
            activate(disable=tuple(set(PATCH_NAMES) - previous), force=True)


# --- patch 2: RNG tracker on the CPU generator ------------------------------------------------------------------


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    del device, clone, graph_safe
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    del device, graph_safe
    torch.set_rng_state(new_state)


def _install_rng(restore: list[tuple[Any, str, Any]]) -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    _set(restore, mcore_random, "_get_cuda_rng_state", _cpu_get_rng_state)
    _set(restore, mcore_random, "_set_cuda_rng_state", _cpu_set_rng_state)


# --- patch 4: DistributedOptimizer's param.type() checks ----------------------------------------------------------

_CPU_TO_CUDA_TYPE = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _cuda_type_names() -> Iterator[None]:
    """While open, ``tensor.type()`` (no argument) reports CPU float tensors under their CUDA type names."""
    original = torch.Tensor.type

    def type_as_cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        if not args and not kwargs:
            return _CPU_TO_CUDA_TYPE.get(result, result)
        return result

    torch.Tensor.type = type_as_cuda  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = original  # type: ignore[method-assign]


def _with_cuda_type_names(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def scoped(*args: Any, **kwargs: Any) -> Any:
        with _cuda_type_names():
            return function(*args, **kwargs)

    return scoped


def _install_param_type(restore: list[tuple[Any, str, Any]]) -> None:
    from megatron.core.optimizer import clip_grads, distrib_optimizer
    from megatron.core.optimizer import optimizer as mcore_optimizer

    optimizer_class = distrib_optimizer.DistributedOptimizer
    build = optimizer_class.__dict__["_build_model_and_main_param_groups"].__func__
    _set(restore, optimizer_class, "_build_model_and_main_param_groups", classmethod(_with_cuda_type_names(build)))
    _set(restore, optimizer_class, "__init__", _with_cuda_type_names(optimizer_class.__init__))
    float16_class = mcore_optimizer.Float16OptimizerWithFloat16Params
    _set(restore, float16_class, "__init__", _with_cuda_type_names(float16_class.__init__))
    clip = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    for module in (clip_grads, mcore_optimizer):
        _set(restore, module, "clip_grad_by_total_norm_fp32", clip)


# --- patch 6: te_general_gemm NameError ---------------------------------------------------------------------------


def _install_te_general_gemm(restore: list[tuple[Any, str, Any]]) -> None:
    from megatron.core.transformer.moe import moe_utils

    if "te_general_gemm" not in moe_utils.__dict__:
        _set(restore, moe_utils, "te_general_gemm", None)  # None selects the plain torch.mm path


# --- patch 7: alltoall split sizes must become host numbers ----------------------------------------------------------


def _move_to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """CPU version of ``maybe_move_tensor_to_cpu``: also converts CPU tensors when ``as_numpy`` (split sizes)."""
    del record_stream
    if torch.is_tensor(tensor):
        tensor = tensor.detach().to(_CPU)
        if as_numpy:
            return tensor.numpy()
    return tensor


def _install_split_sizes(restore: list[tuple[Any, str, Any]]) -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    _set(restore, moe_utils, "maybe_move_tensor_to_cpu", _move_to_host)
    _set(restore, token_dispatcher, "maybe_move_tensor_to_cpu", _move_to_host)


# --- patch 8: sequence-parallel torch norm ----------------------------------------------------------------------------


def _install_sp_norm(restore: list[tuple[Any, str, Any]]) -> None:
    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__

    def new_with_sp(cls: type, config: Any, hidden_size: int, eps: float = 1e-5, **kwargs: Any) -> torch.nn.Module:
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, eps, **kwargs)
        # Build without SP (the norm itself is per token), then tag the params like Megatron's fused norms do, so
        # finalize_model_grads all-reduces their partial grads across the TP group.
        config_no_sp = _shallow_replace(config, sequence_parallel=False)
        norm = original_new(cls, config_no_sp, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    _set(restore, torch_norm.WrappedTorchNorm, "__new__", staticmethod(new_with_sp))


def _shallow_replace(config: Any, **changes: Any) -> Any:
    """Copy of a TransformerConfig with some fields changed, without re-running its (CUDA-probing) __post_init__."""
    clone = object.__new__(type(config))
    clone.__dict__.update(config.__dict__)
    clone.__dict__.update(changes)
    return clone


# --- patch 9: gloo uneven all_gather ----------------------------------------------------------------------------------


def _install_uneven_all_gather(restore: list[tuple[Any, str, Any]]) -> None:
    from megatron.core.tensor_parallel import mappings

    original = mappings._gather_along_first_dim

    def gather_padded(
        input_: torch.Tensor, group: Any, output_split_sizes: list[int] | None = None, use_global_buffer: bool = False
    ) -> torch.Tensor:
        uneven = output_split_sizes is not None and len(set(output_split_sizes)) > 1
        if not uneven or torch.distributed.get_backend(group) != "gloo":
            return original(input_, group, output_split_sizes, use_global_buffer)
        largest = max(output_split_sizes)
        padded = input_.new_zeros((largest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = [torch.empty_like(padded) for _ in output_split_sizes]
        torch.distributed.all_gather(gathered, padded.contiguous(), group=group)
        return torch.cat([chunk[:size] for chunk, size in zip(gathered, output_split_sizes, strict=True)], dim=0)

    _set(restore, mappings, "_gather_along_first_dim", gather_padded)
