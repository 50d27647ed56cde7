"""Channels: the same few operations over a torch.distributed group or over a bridge built from a store.

A :class:`Channel` moves tensors (``broadcast``, ``send``, ``recv``) and small Python objects (``*_object``) between
the ranks of one group, with ranks numbered inside that group. The rollout batch codec and the refit transports are
written against this interface only, so the same bytes travel over a training group (:class:`GroupChannel`) or over
the bridge between training rank 0 and dedicated rollout ranks (:class:`StoreBridge`). Every bridge wait is bounded.
"""

from __future__ import annotations

import pickle
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist

from megatron_dispo.comm.groups import GroupPurpose, register_group

__all__ = ["BridgeError", "Channel", "GlooBridge", "GroupChannel", "StoreBridge"]


class BridgeError(RuntimeError):
    """The other side of a bridge stopped, died, or did not answer within the timeout."""


class Channel(Protocol):
    """Point-to-point and broadcast operations among the ``size`` ranks of one group (``rank`` is ours in it)."""

    rank: int
    size: int
    purpose: GroupPurpose

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor: ...

    def send(self, tensor: torch.Tensor, dst: int) -> None: ...

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor: ...

    def broadcast_object(self, obj: Any, src: int) -> Any: ...

    def send_object(self, obj: Any, dst: int) -> None: ...

    def recv_object(self, src: int) -> Any: ...


def _to_bytes(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)


def _from_bytes(payload: torch.Tensor) -> Any:
    return pickle.loads(payload.cpu().numpy().tobytes())


class GroupChannel:
    """A torch.distributed group (its ranks renumbered 0..size-1); objects are pickled by torch."""

    def __init__(self, group: Any, purpose: GroupPurpose, name: str) -> None:
        self.group = register_group(group, purpose, name)
        self.purpose = purpose
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        if self.size > 1:
            dist.broadcast(tensor, group=self.group, group_src=src)
        return tensor

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place over the group; ``op`` is ``sum`` or ``max``."""
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape everywhere), in group rank order."""
        if self.size == 1:
            return [tensor]
        rows = [torch.zeros_like(tensor) for _ in range(self.size)]
        dist.all_gather(rows, tensor, group=self.group)
        return rows

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        dist.send(tensor.contiguous(), group=self.group, group_dst=dst)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        dist.recv(tensor, group=self.group, group_src=src)
        return tensor

    def broadcast_object(self, obj: Any, src: int) -> Any:
        if self.size == 1:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, group=self.group, group_src=src)
        return holder[0]

    def send_object(self, obj: Any, dst: int) -> None:
        dist.send_object_list([obj], group=self.group, group_dst=dst)

    def recv_object(self, src: int) -> Any:
        holder = [None]
        dist.recv_object_list(holder, group=self.group, group_src=src)
        return holder[0]


class StoreBridge:
    """A standalone process group on a store prefix, never registered in torch.distributed's world (so it cannot
    clash with a rank's default group or a private vLLM world), used only through its own ops.

    ``backend="gloo"`` moves host data (and, on CPU, weights); ``backend="nccl"`` moves GPU tensors (weights from
    training rank 0 to the dedicated rollout ranks on GPU). Objects always go through a gloo bridge.
    """

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        size: int,
        timeout: timedelta,
        *,
        backend: str = "gloo",
        name: str,
        purpose: GroupPurpose | None = None,
    ) -> None:
        """``purpose`` defaults to the backend's (gloo: host, nccl: device); a gloo bridge declared ``device`` stands
        in for the NCCL one where there is no GPU, so the same code moves the same tensors on CPU."""
        self.rank = rank
        self.size = size
        self.timeout = timeout
        self.name = name
        self.purpose: GroupPurpose = purpose or ("host" if backend == "gloo" else "device")
        prefixed = dist.PrefixStore(f"{name}/", store)
        if backend == "gloo":
            self.pg: Any = dist.ProcessGroupGloo(prefixed, rank, size, timeout)
        elif backend == "nccl":
            if not hasattr(dist, "ProcessGroupNCCL"):
                raise RuntimeError(f"{name}: backend='nccl' needs a CUDA build of PyTorch; this one has no NCCL.")
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, size, options)
        else:
            raise ValueError(f"StoreBridge backend={backend!r}: use 'gloo' or 'nccl'.")
        self.backend = backend

    # ------------------------------------------------------------------ tensors
    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._wait(self.pg.send([tensor.contiguous()], dst, 0), f"send to bridge rank {dst}")

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        self._wait(self.pg.recv([tensor], src, 0), f"receive from bridge rank {src}")
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        self._wait(self.pg.broadcast([tensor], opts), f"broadcast from bridge rank {src}")
        return tensor

    # ------------------------------------------------------------------ objects (length header + pickled bytes)
    def send_object(self, obj: Any, dst: int) -> None:
        self._require_host("send_object")
        payload = _to_bytes(obj)
        self.send(torch.tensor([payload.numel()], dtype=torch.int64), dst)
        self.send(payload, dst)

    def recv_object(self, src: int) -> Any:
        self._require_host("recv_object")
        size = self.recv(torch.zeros(1, dtype=torch.int64), src)
        return _from_bytes(self.recv(torch.empty(int(size.item()), dtype=torch.uint8), src))

    def broadcast_object(self, obj: Any, src: int) -> Any:
        """``src``'s object on every bridge rank (others pass None)."""
        self._require_host("broadcast_object")
        size = torch.zeros(1, dtype=torch.int64)
        payload = torch.empty(0, dtype=torch.uint8)
        if self.rank == src:
            payload = _to_bytes(obj)
            size[0] = payload.numel()
        self.broadcast(size, src)
        if self.rank != src:
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
        self.broadcast(payload, src)
        return obj if self.rank == src else _from_bytes(payload)

    def _require_host(self, what: str) -> None:
        if self.purpose != "host":
            raise RuntimeError(f"{self.name}: {what} on a device bridge; objects travel on the host bridge.")

    def _wait(self, work: Any, what: str) -> None:
        if self.pg is None:
            raise BridgeError(f"{self.name} rank {self.rank}: {what} after the bridge was closed.")
        try:
            work.wait(self.timeout)
        except RuntimeError as exc:  # timeout, or the peer's sockets closed (it exited or died)
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BridgeError(
                f"{self.name} rank {self.rank}: {what} failed within {self.timeout.total_seconds():.0f} s (the other "
                f"side stopped or died): {first_line}"
            ) from None

    def close(self) -> None:
        """Drop the group's sockets (the peer's pending ops then fail at once instead of waiting for the timeout)."""
        self.pg = None


GlooBridge = StoreBridge
"""The host bridge (the default backend)."""
