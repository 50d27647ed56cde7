"""Typed, validated configuration of the weight refit (bucket size, transport, FP8, self-check cadence, thresholds)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

__all__ = ["PROBE_THRESHOLDS", "EngineDtype", "RefitConfig", "TransportName"]

TransportName = Literal["auto", "colocated", "cuda_ipc", "nccl"]
"""How the weights reach the engine (see :mod:`.transports`); kept here so the config imports no transport code."""
_TRANSPORTS: tuple[str, ...] = get_args(TransportName)

EngineDtype = Literal["float32", "bfloat16", "fp8"]
"""What the engine computes in: ``rollout.dtype``, or ``fp8`` for an FP8 engine (block e4m3 linears, bf16 rest)."""

PROBE_THRESHOLDS: dict[str, tuple[float, float | None]] = {
    "float32": (1e-3, None),
    "bfloat16": (1.5, 0.15),
    "fp8": (5.0, 0.75),
}
"""Default (max, mean) |engine - trainer| per-token log-prob of the probe, in nats, by engine dtype. fp32 engines
agree to ~1e-5. bf16 and fp8 rounding spreads the deltas, so the mean, not the max, separates a correct refit from a
broken one: on a random 4-layer Qwen3 (hidden 256, CPU, tests/refit/test_gpu_contracts.py) a correct bf16 refit gives
max 0.50 / mean 0.065, a correct FP8 one max 2.4 / mean 0.53, and any swapped projection a mean of 3.8 nats or more.
Random weights are a harsh case for rounding; trained models give smaller deltas (not yet measured on a GPU)."""


@dataclass(frozen=True)
class RefitConfig:
    """How the trainer's weights reach the rollout engine after each optimizer phase, and how the result is checked."""

    # transfer
    bucket_size_mb: float = 256.0
    """Bucket size in MiB: tensors are grouped into buckets of at most this size (a bigger tensor goes alone). It
    bounds the extra memory of the GPU transports (one packed bucket in flight) and sets the number of handles or
    broadcasts per refit."""
    transport: TransportName = "auto"
    """``colocated`` (engine in this process), ``cuda_ipc`` (engine workers on the same GPUs), ``nccl`` (separate
    engine ranks) or ``auto`` (colocated when the engine is in-process, else nccl with a group, else cuda_ipc)."""
    fp8: bool = False
    """Send linear weights as 128x128 block e4m3 + ``weight_scale_inv`` (the engine must be an FP8 block-quantised
    model built with :func:`megatron_dispo.refit.fp8.fp8_quantization_config`)."""

    # self-check
    check_every: int = 1
    """Run the probe self-check after every N-th refit (1: every refit; 0: never)."""
    probe_max_abs_threshold: float | None = None
    """Largest allowed |engine - trainer| per-token log-prob on the probe batch, in nats; None: by the engine's dtype
    (:data:`PROBE_THRESHOLDS`, see :meth:`probe_thresholds`)."""
    probe_mean_abs_threshold: float | None = None
    """Bound on the mean |delta log-prob| over probe tokens; None: by the engine's dtype (none for fp32)."""
    localize_on_failure: bool = True
    """On a failed check, read the engine's parameters back and name the tensor whose checksums differ most."""
    checksum_rtol: float = 1e-4
    """Relative tolerance of the localisation's checksum comparison (sums differ by float reordering only)."""
    validate_names: bool = True
    """Compare trainer names/shapes with the engine's expected set (from its checkpoint or the first refit)."""

    def __post_init__(self) -> None:
        if not (isinstance(self.bucket_size_mb, (int, float)) and math.isfinite(self.bucket_size_mb)):
            raise ValueError(f"bucket_size_mb={self.bucket_size_mb!r} must be a finite number of MiB, e.g. 256.")
        if self.bucket_size_mb <= 0:
            raise ValueError(f"bucket_size_mb={self.bucket_size_mb} must be positive; 256 MiB is a good default.")
        if self.transport not in _TRANSPORTS:
            raise ValueError(f"transport={self.transport!r} is not one of {_TRANSPORTS}.")
        if not isinstance(self.check_every, int) or isinstance(self.check_every, bool) or self.check_every < 0:
            raise ValueError(f"check_every={self.check_every!r} must be an integer >= 0 (0 disables the self-check).")
        top = self.probe_max_abs_threshold
        if top is not None and not (top > 0 and math.isfinite(top)):
            raise ValueError(
                f"probe_max_abs_threshold={top} must be None (by engine dtype) or a positive finite number of nats; "
                f"the defaults are {PROBE_THRESHOLDS}."
            )
        mean = self.probe_mean_abs_threshold
        if mean is not None and not (mean > 0 and math.isfinite(mean)):
            raise ValueError(f"probe_mean_abs_threshold={mean} must be None or a positive finite number of nats.")
        if not 0 < self.checksum_rtol < 1:
            raise ValueError(f"checksum_rtol={self.checksum_rtol} must be in (0, 1); 1e-4 suits fp32 and bf16.")

    def probe_thresholds(self, engine_dtype: EngineDtype) -> tuple[float, float | None]:
        """(max, mean) probe thresholds for an engine computing in ``engine_dtype``: the fields where set, else the
        dtype's defaults. An fp32 engine's default has no mean bound; a set max alone keeps that."""
        if engine_dtype not in PROBE_THRESHOLDS:
            raise ValueError(f"engine dtype {engine_dtype!r} is not one of {sorted(PROBE_THRESHOLDS)}.")
        default_max, default_mean = PROBE_THRESHOLDS[engine_dtype]
        top = self.probe_max_abs_threshold if self.probe_max_abs_threshold is not None else default_max
        mean = self.probe_mean_abs_threshold
        if mean is None and self.probe_max_abs_threshold is None:
            mean = default_mean
        return top, mean

    def check_due(self, refit_index: int) -> bool:
        """Whether the ``refit_index``-th refit (1-based) runs the probe self-check: the 1st, then every
        ``check_every``-th. One rule for the trainer (which computes its probe log-probs on every rank) and the
        :class:`~megatron_dispo.refit.refit.Refitter` (which scores the probe in the engine)."""
        return self.check_every > 0 and (refit_index - 1) % self.check_every == 0

    @property
    def bucket_bytes(self) -> int:
        """Bucket size in bytes."""
        return max(1, int(self.bucket_size_mb * (1 << 20)))
