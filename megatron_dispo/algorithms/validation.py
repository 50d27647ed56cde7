"""Input checks for the policy losses: every error names the argument, the rule and the fix.

Checks are cheap next to the forward that produced the log-probs (a few elementwise passes), so they always run.
"""

from __future__ import annotations

import math

import torch


def require_tensor(name: str, value: object) -> torch.Tensor:
    """TypeError unless `value` is a tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}; wrap it with torch.as_tensor().")
    return value


def require_finite(items: list[tuple[str, torch.Tensor, str]]) -> None:
    """ValueError naming the first tensor (of `(name, tensor, hint)` items) with a non-finite element, and where."""
    for name, tensor, hint in items:
        finite = torch.isfinite(tensor.detach())
        if not bool(finite.all()):
            bad = (~finite).nonzero()
            index = tuple(bad[0].tolist())
            value = tensor.detach()[index].item()
            raise ValueError(f"{name} has {bad.shape[0]} non-finite value(s), first at index {index} = {value}; {hint}")


def broadcast_per_sequence(name: str, tensor: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """Accept [batch] / [batch, 1] (per sequence) or [batch, seq] (per token); return [batch, 1] or [batch, seq]."""
    shape = tuple(tensor.shape)
    if shape in ((batch,), (batch, 1)):
        return tensor.reshape(batch, 1)
    if shape == (batch, seq):
        return tensor
    raise ValueError(
        f"{name} has shape {list(shape)}; expected [{batch}] or [{batch}, 1] (one value per sequence) or "
        f"[{batch}, {seq}] (one per token) to match logprobs [{batch}, {seq}]."
    )


def float_mask(response_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The mask as 0.0/1.0 in `dtype`; ValueError unless it holds only 0 and 1 (NaN fails too), TypeError if complex."""
    if response_mask.dtype == torch.bool:
        return response_mask.to(dtype)
    if response_mask.dtype.is_complex:
        raise TypeError(f"response_mask has dtype {response_mask.dtype}; use bool or 0/1 integers or floats.")
    as_float = response_mask.to(dtype)
    if bool(((as_float != 0) & (as_float != 1)).any()):
        low, high = (float(v) for v in torch.aminmax(as_float))
        raise ValueError(
            f"response_mask must hold only 0 and 1 (found values in [{low:g}, {high:g}] that are not all 0/1); "
            "it marks response tokens (1 = response token, 0 = prompt/padding). Pass a bool mask or a 0/1 tensor."
        )
    return as_float


def as_global_count(name: str, value: object, local_count: float, unit: str) -> float | None:
    """Validate a global normaliser (num_global_tokens / num_global_sequences): a positive number that is at least
    this micro-batch's own count (a smaller value means it was computed on the wrong set)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {list(value.shape)}.")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite positive number of {unit}.")
    if value <= 0:
        raise ValueError(
            f"{name}={value} must be > 0: it is the number of {unit} in the whole mini-batch across micro-batches "
            "and data-parallel ranks; a mini-batch without any makes no update, so skip it instead."
        )
    if local_count > value + 1e-6 * max(1.0, value):
        raise ValueError(
            f"{name}={value} is smaller than this micro-batch's own {local_count:g} {unit}; it must count the whole "
            "mini-batch across all micro-batches and data-parallel ranks (compute it before the first micro-batch)."
        )
    return float(value)
