"""Typed, validated configuration of the weight refit (bucket size, transport, FP8, self-check cadence, thresholds)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

__all__ = ["RefitConfig", "TransportName"]

TransportName = Literal["auto", "colocated", "cuda_ipc", "nccl"]
"""How the weights reach the engine (see :mod:`.transports`); kept here so the config imports no transport code."""
_TRANSPORTS: tuple[str, ...] = get_args(TransportName)


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
    probe_max_abs_threshold: float = 1e-3
    """Largest allowed |engine - trainer| per-token log-prob on the probe batch, in nats. fp32 engines agree to ~1e-5;
    bf16 engines need ~0.1-0.5 (bf16 rounding of logits)."""
    probe_mean_abs_threshold: float | None = None
    """Optional bound on the mean |delta log-prob| over probe tokens; None checks only the maximum."""
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
        if not (self.probe_max_abs_threshold > 0 and math.isfinite(self.probe_max_abs_threshold)):
            raise ValueError(
                f"probe_max_abs_threshold={self.probe_max_abs_threshold} must be a positive finite number of nats; "
                "use 1e-3 for fp32 engines, ~0.5 for bf16."
            )
        mean = self.probe_mean_abs_threshold
        if mean is not None and not (mean > 0 and math.isfinite(mean)):
            raise ValueError(f"probe_mean_abs_threshold={mean} must be None or a positive finite number of nats.")
        if not 0 < self.checksum_rtol < 1:
            raise ValueError(f"checksum_rtol={self.checksum_rtol} must be in (0, 1); 1e-4 suits fp32 and bf16.")

    def check_due(self, refit_index: int) -> bool:
        """Whether the ``refit_index``-th refit (1-based) runs the probe self-check: the 1st, then every
        ``check_every``-th. One rule for the trainer (which computes its probe log-probs on every rank) and the
        :class:`~megatron_dispo.refit.refit.Refitter` (which scores the probe in the engine)."""
        return self.check_every > 0 and (refit_index - 1) % self.check_every == 0

    @property
    def bucket_bytes(self) -> int:
        """Bucket size in bytes."""
        return max(1, int(self.bucket_size_mb * (1 << 20)))
