"""A packed bucket as a CUDA-IPC handle, and its inverse: the payload both ends of the ``cuda_ipc`` transport share.

Kept apart from :mod:`.transports` (the sender) and :mod:`.vllm_worker` (the receiver inside the engine's worker)
so that each imports this module and neither imports the other's side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from megatron_dispo.refit.buckets import BucketLayout, NamedTensor, PackedBucket, unpack_bucket

__all__ = ["IpcBucketPayload", "rebuild_ipc_bucket", "serialize_ipc_bucket"]

_CUDA_DEVICE_ARG = 6  # position of ``storage_device`` in rebuild_cuda_tensor's arguments


@dataclass(frozen=True)
class IpcBucketPayload:
    """A packed bucket as a CUDA-IPC handle: picklable, a few hundred bytes whatever the bucket size."""

    rebuild_fn: Callable[..., Tensor]
    """``torch.multiprocessing.reductions.rebuild_cuda_tensor`` (or ``rebuild_tensor`` for a CPU buffer)."""
    rebuild_args: tuple[Any, ...]
    """Arguments of ``rebuild_fn`` from ``reduce_tensor``; for CUDA, index 6 is the device index."""
    layout: BucketLayout
    """Names, shapes, dtypes and offsets inside the buffer."""
    device_uuid: str | None
    """UUID of the GPU holding the buffer, so a worker maps the handle on the same physical GPU."""


def serialize_ipc_bucket(packed: PackedBucket) -> IpcBucketPayload:
    """Handle + layout for a packed bucket; the buffer must stay alive until the receiver has loaded it."""
    from torch.multiprocessing.reductions import reduce_tensor

    rebuild_fn, rebuild_args = reduce_tensor(packed.buffer)
    uuid = None
    if packed.buffer.is_cuda:
        uuid = str(torch.cuda.get_device_properties(packed.buffer.device).uuid)
    return IpcBucketPayload(rebuild_fn, tuple(rebuild_args), packed.layout, uuid)


def rebuild_ipc_bucket(payload: IpcBucketPayload, device_index: int | None = None) -> list[NamedTensor]:
    """Map the bucket's buffer in this process and return views of its named tensors (the receiving side).

    ``device_index`` is this process's index of the GPU the sender used (CUDA_VISIBLE_DEVICES may renumber GPUs per
    process); ``None`` keeps the sender's index.
    """
    args = list(payload.rebuild_args)
    if payload.device_uuid is not None and device_index is not None:
        args[_CUDA_DEVICE_ARG] = device_index
    buffer = payload.rebuild_fn(*args)
    return unpack_bucket(buffer, payload.layout)
