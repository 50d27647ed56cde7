"""Group a lazy stream of ``(hf_name, tensor)`` into size-capped buckets, and pack a bucket into one flat buffer.

Refit streams the Megatron export generator into the rollout engine. Two rules keep peak memory bounded on the rank
that gathers the full tensors: the stream is consumed lazily (at most one bucket plus the one tensor that did not fit
are alive in this module at any time), and a bucket never holds a reference once it has been handed on.

The packed form (one contiguous ``uint8`` buffer plus :class:`BucketLayout`) is what the GPU transports move: a single
CUDA-IPC handle or a single NCCL broadcast per bucket instead of one per tensor. Offsets are aligned to
:data:`BUFFER_ALIGNMENT` bytes so every tensor view starts on an address valid for any dtype (and for vectorised GPU
loads).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BUFFER_ALIGNMENT",
    "BucketLayout",
    "NamedTensor",
    "PackedBucket",
    "TensorSlot",
    "iter_buckets",
    "pack_bucket",
    "plan_layout",
    "unpack_bucket",
]

BUFFER_ALIGNMENT = 256
"""Byte alignment of every tensor inside a packed bucket (covers every dtype's alignment and 256-byte GPU loads)."""

NamedTensor = tuple[str, Tensor]


def _tensor_nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def iter_buckets(
    named_tensors: Iterable[NamedTensor],
    bucket_bytes: int,
    *,
    group_of: Callable[[str], str] | None = None,
    group_sizes: Mapping[str, int] | None = None,
) -> Iterator[list[NamedTensor]]:
    """Yield consecutive groups of tensors whose total size is at most ``bucket_bytes``.

    A tensor larger than ``bucket_bytes`` is yielded alone. Consumption is lazy: the next tensor is pulled from
    ``named_tensors`` only when the current bucket has been handed on or still has room, so at most one bucket plus one
    tensor are referenced here at a time (the caller must drop a bucket before asking for the next one to keep the
    bound). Order is preserved. Duplicate names raise ``ValueError`` (the engine would silently load one twice).

    Fused groups: vLLM loads q/k/v into one ``qkv_proj`` (gate/up, all experts of a layer likewise) and an in-place
    reload must see a whole group in one call. With ``group_of`` (name -> group key) and ``group_sizes`` (members per
    group; missing keys count 1), a bucket is only cut where no group is half-sent: a bucket may then exceed
    ``bucket_bytes`` by the rest of the groups it has started.
    """
    if not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool) or bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes!r} must be a positive integer number of bytes.")
    sizes = group_sizes or {}
    seen: set[str] = set()
    bucket: list[NamedTensor] = []
    bucket_size = 0
    open_groups: dict[str, int] = {}  # group -> members still to come, for groups started in this bucket
    for name, tensor in named_tensors:
        if not isinstance(tensor, Tensor):
            raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, expected torch.Tensor.")
        if name in seen:
            raise ValueError(f"tensor name {name!r} appears twice in the export stream; each name must be sent once.")
        seen.add(name)
        size = _tensor_nbytes(tensor)
        if bucket and not open_groups and bucket_size + size > bucket_bytes:
            ready, bucket, bucket_size = bucket, [], 0
            yield ready
            del ready  # the consumer owns it now; do not keep it alive while pulling the next tensor
        bucket.append((name, tensor))
        bucket_size += size
        if group_of is not None:
            group = group_of(name)
            remaining = open_groups.get(group, sizes.get(group, 1)) - 1
            if remaining > 0:
                open_groups[group] = remaining
            else:
                open_groups.pop(group, None)
        del tensor
    if bucket:
        yield bucket


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives inside a packed bucket."""

    name: str
    """HF parameter name."""
    shape: tuple[int, ...]
    """Shape of the tensor."""
    dtype: torch.dtype
    """Element type (any dtype, float8 included: bytes are copied verbatim)."""
    offset: int
    """Byte offset of the first element in the flat buffer (a multiple of :data:`BUFFER_ALIGNMENT`)."""
    nbytes: int
    """Size in bytes (numel * element size)."""


@dataclass(frozen=True)
class BucketLayout:
    """Metadata that turns a flat ``uint8`` buffer back into named tensors; small and picklable (sent per bucket)."""

    slots: tuple[TensorSlot, ...]
    """One slot per tensor, in send order."""
    total_bytes: int
    """Size of the flat buffer in bytes (last slot's end, aligned)."""

    @property
    def names(self) -> list[str]:
        """Tensor names in send order."""
        return [slot.name for slot in self.slots]

    @property
    def payload_bytes(self) -> int:
        """Bytes of tensor data, without alignment padding."""
        return sum(slot.nbytes for slot in self.slots)


@dataclass(frozen=True)
class PackedBucket:
    """A bucket as one contiguous ``uint8`` buffer plus its layout."""

    buffer: Tensor
    """1-D ``uint8`` tensor of ``layout.total_bytes`` bytes."""
    layout: BucketLayout
    """Names, shapes, dtypes and byte offsets of the tensors in ``buffer``."""


def _aligned(offset: int) -> int:
    return int(math.ceil(offset / BUFFER_ALIGNMENT) * BUFFER_ALIGNMENT)


def plan_layout(named_tensors: Sequence[NamedTensor]) -> BucketLayout:
    """Byte layout of ``named_tensors`` packed one after the other, each start aligned to :data:`BUFFER_ALIGNMENT`."""
    slots: list[TensorSlot] = []
    offset = 0
    for name, tensor in named_tensors:
        nbytes = _tensor_nbytes(tensor)
        slots.append(TensorSlot(name, tuple(tensor.shape), tensor.dtype, offset, nbytes))
        offset = _aligned(offset + nbytes)
    return BucketLayout(tuple(slots), offset)


def _as_bytes(tensor: Tensor) -> Tensor:
    """The tensor's elements as a flat ``uint8`` view (copies only if it is not contiguous)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8)


def pack_bucket(named_tensors: Sequence[NamedTensor], *, device: torch.device | str | None = None) -> PackedBucket:
    """Copy the tensors into one new contiguous ``uint8`` buffer on ``device`` (default: the first tensor's device)."""
    if not named_tensors:
        raise ValueError("cannot pack an empty bucket; iter_buckets never yields one.")
    layout = plan_layout(named_tensors)
    target = torch.device(device) if device is not None else named_tensors[0][1].device
    buffer = torch.empty(layout.total_bytes, dtype=torch.uint8, device=target)
    for slot, (_, tensor) in zip(layout.slots, named_tensors, strict=True):
        if slot.nbytes:
            buffer[slot.offset : slot.offset + slot.nbytes].copy_(_as_bytes(tensor), non_blocking=True)
    return PackedBucket(buffer, layout)


def unpack_bucket(buffer: Tensor, layout: BucketLayout) -> list[NamedTensor]:
    """Views of the named tensors inside ``buffer`` (no copy): the inverse of :func:`pack_bucket`.

    Raises ``ValueError`` if the buffer is not a 1-D ``uint8`` tensor of exactly ``layout.total_bytes`` bytes (a
    truncated or mismatched transfer must never be loaded).
    """
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise ValueError(f"packed buffer must be a 1-D uint8 tensor, got dtype={buffer.dtype} dim={buffer.dim()}.")
    if buffer.numel() != layout.total_bytes:
        raise ValueError(
            f"packed buffer has {buffer.numel()} bytes but its layout describes {layout.total_bytes}; "
            "buffer and layout come from different buckets or the transfer was truncated."
        )
    tensors: list[NamedTensor] = []
    for slot in layout.slots:
        raw = buffer[slot.offset : slot.offset + slot.nbytes]
        tensors.append((slot.name, raw.view(slot.dtype).view(slot.shape)))
    return tensors
