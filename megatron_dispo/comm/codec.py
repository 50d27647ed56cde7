"""One codec for tables of tensors (a rollout batch, a bucket of weights): a small header, then one byte buffer.

A table is a mapping name -> tensor. Encoding packs every present, non-empty tensor into one flat ``uint8`` buffer
(8-byte aligned, so each column is viewed back in place without a copy) and describes it in a :class:`TableHeader`:
names, dtypes, shapes, offsets. Decoding views the columns out of the received buffer. So any dtype travels
(gloo and NCCL move neither ``bool`` nor ``int16``), any number of columns costs two transfers (the header as an
object on a host channel, the buffer on a host or device channel), and adding a column is declaring it where the
table is defined, nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_dispo.comm.channel import Channel

__all__ = [
    "Column",
    "ColumnSpec",
    "TableHeader",
    "broadcast_table",
    "decode_table",
    "encode_table",
    "receive_buffers",
    "recv_table",
    "send_table",
]

RowKind = Literal["sequence", "token", "response_token", "none"]
_ALIGN = 8


@dataclass(frozen=True)
class Column:
    """Declaration of one column of a table: what its first dimension counts (for slicing rows out of it)."""

    rows: RowKind


@dataclass(frozen=True)
class ColumnSpec:
    """Where one column lies in the buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class TableHeader:
    """Everything a receiver needs to allocate the buffer and view the columns back (a few hundred bytes)."""

    columns: tuple[ColumnSpec, ...]
    total_bytes: int
    absent: tuple[str, ...] = ()
    """Columns that are None in the table (optional columns not filled)."""

    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"table header names an unknown dtype {name!r}.")
    return dtype


def encode_table(
    table: Mapping[str, torch.Tensor | None], device: torch.device | None = None
) -> tuple[TableHeader, torch.Tensor]:
    """(header, flat uint8 buffer) of ``table``; the buffer lives on ``device`` (default: the CPU)."""
    specs: list[ColumnSpec] = []
    absent: list[str] = []
    offset = 0
    for name, tensor in table.items():
        if tensor is None:
            absent.append(name)
            continue
        nbytes = tensor.numel() * tensor.element_size()
        specs.append(ColumnSpec(name, str(tensor.dtype), tuple(tensor.shape), offset, nbytes))
        offset += -(-nbytes // _ALIGN) * _ALIGN
    buffer = torch.zeros(offset, dtype=torch.uint8, device=device or torch.device("cpu"))
    for spec in specs:
        tensor = table[spec.name]
        assert tensor is not None
        if spec.nbytes:
            flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            buffer[spec.offset : spec.offset + spec.nbytes].copy_(flat)
    return TableHeader(tuple(specs), offset, tuple(absent)), buffer


def receive_buffers(header: TableHeader, device: torch.device | None = None) -> torch.Tensor:
    """The empty buffer a receiver fills for ``header``."""
    return torch.empty(header.total_bytes, dtype=torch.uint8, device=device or torch.device("cpu"))


def decode_table(header: TableHeader, buffer: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """The columns of ``buffer`` as views (no copy), plus the absent ones as None."""
    out: dict[str, torch.Tensor | None] = {}
    for spec in header.columns:
        dtype = _dtype(spec.dtype)
        raw = buffer[spec.offset : spec.offset + spec.nbytes]
        out[spec.name] = (raw.view(dtype) if spec.nbytes else torch.empty(0, dtype=dtype)).reshape(spec.shape)
    out.update(dict.fromkeys(header.absent))
    return out


def broadcast_table(
    table: Mapping[str, torch.Tensor | None] | None,
    src: int,
    meta: Channel,
    data: Channel | None = None,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor | None]:
    """``src``'s table on every rank of the channels: the header on ``meta`` (host), the buffer on ``data`` (host by
    default; a device channel with ``device`` for tensors that live on the GPU)."""
    data = data or meta
    if meta.rank == src:
        if table is None:
            raise ValueError("broadcast_table: the source rank must pass its table.")
        header, buffer = encode_table(table, device)
        meta.broadcast_object(header, src)
        if header.total_bytes:
            data.broadcast(buffer, src)
        return dict(table)
    header = meta.broadcast_object(None, src)
    buffer = receive_buffers(header, device)
    if header.total_bytes:
        data.broadcast(buffer, src)
    return decode_table(header, buffer)


def send_table(table: Mapping[str, torch.Tensor | None], dst: int, channel: Channel) -> None:
    """Point-to-point: header then buffer to ``dst`` (host channel)."""
    header, buffer = encode_table(table)
    channel.send_object(header, dst)
    if header.total_bytes:
        channel.send(buffer, dst)


def recv_table(src: int, channel: Channel) -> dict[str, torch.Tensor | None]:
    """Inverse of :func:`send_table`."""
    header: TableHeader = channel.recv_object(src)
    buffer = receive_buffers(header)
    if header.total_bytes:
        channel.recv(buffer, src)
    return decode_table(header, buffer)
