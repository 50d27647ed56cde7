"""The one-pass CPU kernel of the clipped-IS-weight losses (`csrc/clipped_weight_loss.cpp`), built on first use.

Why: on CPU, eager torch pays a full memory pass per elementwise op, and DISPO's gradient plus its per-regime
telemetry and input checks need ~25 of them; the kernel reads logprobs, old_logprobs and the mask once. It has no
torch headers (a plain C ABI on raw pointers, called through ctypes), so the build takes about a second, with the
system C++ compiler (`$CXX`, default `c++`).

Cache: `$MEGATRON_DISPO_KERNEL_DIR`, default `$XDG_CACHE_HOME/megatron_dispo/kernels` (`~/.cache/...`). The file name
holds the instruction set the kernel was built for (from torch's CPU capability) and a hash of the source and flags,
so a cache shared by different machines never loads a binary for instructions the CPU lacks; it is written under a
temporary name and renamed, so concurrent processes never load a half-written file.

Switches: `MEGATRON_DISPO_FUSED_LOSS=0` in the environment, or `ENABLED = False` (tests force the eager path with it).
When the compiler is missing or the build fails, one warning is logged and this process uses the eager path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = ["ENABLED", "ISA_FLAGS", "ClippedWeightKernel", "KernelStats", "build", "kernel", "native_isa"]

_LOG = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("csrc") / "clipped_weight_loss.cpp"
_ABI_VERSION = 1

ENABLED: bool = True
"""Module-level switch; the environment variable MEGATRON_DISPO_FUSED_LOSS=0 also disables the kernel."""


class KernelStats(NamedTuple):
    """The kernel's float64 outputs (the `Slot` enum of the source), all summed over this call's tokens."""

    value: float
    """The loss value sum_t g_t * logprobs_t."""
    regime_stats: list[float]
    """12 values, the row-major [2, 6] layout of `telemetry.regime_stats_from_tokens`."""
    log_ratio_abs_sum: float
    disagree_tokens: float
    advantage_sum: float
    """Finiteness probe of the advantages (log_ratio_abs_sum is the probe of logprobs and old_logprobs)."""
    tokens: float
    nonempty_rows: float
    bad_mask_rows: float
    """Rows whose mask holds a value other than 0 or 1."""
    scale: float
    """The 1/N used: the given one, or 1 / this call's mask sum (0 for an empty mask)."""


_NUM_SLOTS = len(KernelStats._fields) - 1 + 12
"""Doubles the kernel writes: the fields of `KernelStats`, with regime_stats as its 12 values."""

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1}


ISA_FLAGS: dict[str, list[str]] = {
    "avx512": ["-DVB=64", "-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512vl"],
    "avx2": ["-DVB=32", "-mavx2", "-mfma"],
    "generic": ["-DVB=16"],
}
"""Compiler flags per instruction-set variant (VB: vector width in bytes)."""


def native_isa() -> str:
    """The variant for this CPU, from the instruction set torch itself dispatches to."""
    capability = torch.backends.cpu.get_cpu_capability()
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(capability, "generic")


def cache_dir() -> Path:
    explicit = os.environ.get("MEGATRON_DISPO_KERNEL_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "megatron_dispo" / "kernels"


def build(directory: Path | None = None, isa: str | None = None) -> Path:
    """Compile the kernel into the cache (no-op when the same source and flags are there); returns the library path.

    isa: a key of `ISA_FLAGS` (default: `native_isa()`). Raises RuntimeError with the compiler's message when there
    is no compiler or the build fails."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler '{compiler}' on PATH (set CXX, or install g++/clang++)")
    isa = isa or native_isa()
    if isa not in ISA_FLAGS:
        raise ValueError(f"isa={isa!r} is unknown; use one of {sorted(ISA_FLAGS)}.")
    flags = ["-O3", "-fno-math-errno", "-shared", "-fPIC", *ISA_FLAGS[isa]]
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    directory = directory or cache_dir()
    library = directory / f"clipped_weight_loss-{isa}-{key}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=library.stem, suffix=".so.tmp", dir=directory)
    os.close(handle)
    try:
        result = subprocess.run([compiler, *flags, "-o", tmp, str(_SOURCE)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed building {_SOURCE.name}:\n{result.stderr.strip()}")
        os.replace(tmp, library)  # atomic: a concurrent process sees no file or the whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return library


class ClippedWeightKernel:
    """ctypes binding of `megatron_dispo_clipped_weight_loss`; one float64 output buffer per thread."""

    def __init__(self, library: Path) -> None:
        lib = ctypes.CDLL(str(library))
        if lib.megatron_dispo_abi_version() != _ABI_VERSION:
            raise RuntimeError(f"{library} has ABI {lib.megatron_dispo_abi_version()}, expected {_ABI_VERSION}")
        fn = lib.megatron_dispo_clipped_weight_loss
        pointer, double, int64 = ctypes.c_void_p, ctypes.c_double, ctypes.c_int64
        fn.argtypes = [ctypes.c_int, *[pointer] * 5, ctypes.c_int, *[double] * 5, int64, int64, pointer, pointer]
        fn.restype = None
        self._fn: Callable[..., None] = fn
        self._library = lib  # keep the library loaded as long as the binding lives
        self._outputs = threading.local()

    def __call__(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        mask: torch.Tensor,
        advantages: torch.Tensor,
        correct: torch.Tensor | None,
        side_by_correct: bool,
        log_bounds: tuple[float, float, float, float],
        scale: float,
        grad: torch.Tensor,
    ) -> KernelStats:
        """Fill `grad` with dLoss/dlogprobs and return the sums of `KernelStats`.

        All tensors are contiguous CPU tensors of one float dtype ([batch, seq]; advantages [batch]), except
        `correct` (bool [batch] or None). log_bounds = (log lo+, log hi+, log lo-, log hi-). scale = 1/N, or 0 to
        use this call's mask sum. The caller checks all of this (`losses._fused_policy_loss`)."""
        out = getattr(self._outputs, "buffer", None)
        if out is None:
            out = self._outputs.buffer = (ctypes.c_double * _NUM_SLOTS)()
        batch, seq = logprobs.shape
        self._fn(
            _DTYPE_CODES[logprobs.dtype],
            logprobs.data_ptr(),
            old_logprobs.data_ptr(),
            mask.data_ptr(),
            advantages.data_ptr(),
            None if correct is None else correct.data_ptr(),
            int(side_by_correct),
            *log_bounds,
            scale,
            batch,
            seq,
            grad.data_ptr(),
            ctypes.addressof(out),
        )
        values = out[:]
        return KernelStats(values[0], values[1:13], *values[13:])


_lock = threading.Lock()
_kernel: ClippedWeightKernel | None = None
_failed = False


def enabled() -> bool:
    """The switch and the environment variable (says nothing about whether the kernel builds)."""
    return ENABLED and os.environ.get("MEGATRON_DISPO_FUSED_LOSS", "1") != "0"


def kernel() -> ClippedWeightKernel | None:
    """The loaded kernel, building it on the first call; None when disabled or unavailable (eager path then)."""
    global _kernel, _failed
    if _kernel is not None or _failed or not enabled():
        return _kernel if enabled() else None
    with _lock:
        if _kernel is None and not _failed:
            try:
                _kernel = ClippedWeightKernel(build())
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                _failed = True
                _LOG.warning("fused CPU policy-loss kernel unavailable, using the eager path: %s", error)
    return _kernel
