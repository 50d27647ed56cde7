"""Two worlds in one torchrun job: the training world, and a gloo bridge from training rank 0 to the rollout ranks.

Megatron's ``initialize_model_parallel`` builds its groups over the whole *default* world, so rollout-only ranks must
not be in it. With ``rollout.placement=dedicated`` the last ``rollout.num_ranks`` ranks of a job of W processes run only
engines, and:

- training ranks ``0..W-n-1`` start their default group over themselves only (:func:`init_training_world`), on a
  prefix of the job's rendezvous store (torchrun's agent store, or one hosted by global rank 0 without torchrun), so no
  second port has to be agreed on;
- training rank 0 and the rollout ranks form a :class:`Bridge`: a standalone ``ProcessGroupGloo`` on another prefix of
  the same store, used only through its own ops (``pg.send`` / ``pg.recv`` / ``pg.broadcast``), so it is never
  registered in torch.distributed's world and cannot clash with the rollout rank's private vLLM world.

Every wait is bounded: gloo raises after the bridge's timeout, and a peer that died closes its sockets, which fails
the other side's pending op at once.
"""

from __future__ import annotations

import os
import pickle
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Bridge", "BridgeError", "JobLayout", "init_rollout_world", "init_training_world", "job_layout", "job_store"]


class BridgeError(RuntimeError):
    """The other side of the bridge stopped, died, or did not answer within the timeout."""


class JobLayout:
    """Where this process sits in a dedicated-placement job (global ranks from torchrun)."""

    def __init__(self, global_rank: int, global_world: int, num_rollout_ranks: int) -> None:
        if not 1 <= num_rollout_ranks < global_world:
            raise ValueError(
                f"rollout.placement=dedicated with rollout.num_ranks={num_rollout_ranks} needs a job of more than "
                f"{num_rollout_ranks} processes (got {global_world}); launch with torchrun --nproc_per_node="
                f"{num_rollout_ranks + 1} or more."
            )
        self.global_rank = global_rank
        self.global_world = global_world
        self.num_rollout_ranks = num_rollout_ranks
        self.train_world = global_world - num_rollout_ranks
        """Processes that train (the default world of the training ranks)."""

    @property
    def is_rollout_rank(self) -> bool:
        return self.global_rank >= self.train_world

    @property
    def bridge_rank(self) -> int | None:
        """0 for training rank 0, 1..n for the rollout ranks, None for the other training ranks."""
        if self.global_rank == 0:
            return 0
        if self.is_rollout_rank:
            return self.global_rank - self.train_world + 1
        return None

    @property
    def bridge_size(self) -> int:
        return self.num_rollout_ranks + 1


def job_layout(num_rollout_ranks: int) -> JobLayout:
    """This process's place in the job, from torchrun's RANK / WORLD_SIZE."""
    return JobLayout(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), num_rollout_ranks)


def job_store(layout: JobLayout, timeout: timedelta) -> dist.Store:
    """The job's rendezvous store, prefixed per restart attempt: torchrun's agent store, or global rank 0's own.

    Under torchrun (``TORCHELASTIC_USE_AGENT_STORE=True``) the agent already serves a store at MASTER_PORT and every
    worker joins it as a client; a plain multi-process launch has global rank 0 host it there.
    """
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ["MASTER_PORT"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(host, port, layout.global_world, not agent and layout.global_rank == 0, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"/megatron_dispo/attempt_{attempt}/", store)


def init_training_world(layout: JobLayout, store: dist.Store, timeout: timedelta) -> None:
    """The default process group over the training ranks only (then ``initialize_parallel`` finds it initialised).

    WORLD_SIZE is set to the training world, so code that reads it (``Config.validate_for_world``) sees that world.
    """
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    os.environ["WORLD_SIZE"] = str(layout.train_world)
    dist.init_process_group(
        backend,
        store=dist.PrefixStore("train/", store),
        rank=layout.global_rank,
        world_size=layout.train_world,
        timeout=timeout,
    )


def init_rollout_world(layout: JobLayout, store: dist.Store, timeout: timedelta) -> None:
    """With several rollout ranks: the default process group over them only, the world of their engine replicas
    (``ReplicatedEngine``; rollout rank 0 drives). One rollout rank needs no world.

    RANK / WORLD_SIZE / LOCAL_WORLD_SIZE are set to that world (replicas never span nodes: the rollout ranks are the
    job's last ranks, so with a training world that fills whole nodes they start on a node boundary).
    """
    size = layout.num_rollout_ranks
    rank = layout.global_rank - layout.train_world
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_WORLD_SIZE=str(min(per_node, size)))
    if size == 1:
        return
    dist.init_process_group(
        "gloo", store=dist.PrefixStore("rollout/", store), rank=rank, world_size=size, timeout=timeout
    )


class Bridge:
    """A gloo group of training rank 0 (bridge rank 0) and the rollout ranks; point-to-point messages and broadcasts.

    Objects travel as a length header and a pickled byte tensor (a few per step: batch metadata, metrics, control),
    tensors as they are. Every call returns or raises :class:`BridgeError` within ``timeout``.
    """

    def __init__(self, store: dist.Store, rank: int, size: int, timeout: timedelta) -> None:
        self.rank = rank
        self.size = size
        self.timeout = timeout
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore("bridge/", store), rank, size, timeout)
        self._tag = 0

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

    # ------------------------------------------------------------------ objects
    def send_object(self, obj: Any, dst: int) -> None:
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        self.send(torch.tensor([payload.numel()], dtype=torch.int64), dst)
        self.send(payload, dst)

    def recv_object(self, src: int) -> Any:
        size = self.recv(torch.zeros(1, dtype=torch.int64), src)
        payload = self.recv(torch.empty(int(size.item()), dtype=torch.uint8), src)
        return pickle.loads(payload.numpy().tobytes())

    def broadcast_object(self, obj: Any, src: int) -> Any:
        """``src``'s object on every bridge rank (others pass None)."""
        size = torch.zeros(1, dtype=torch.int64)
        payload = torch.empty(0, dtype=torch.uint8)
        if self.rank == src:
            payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            size[0] = payload.numel()
        self.broadcast(size, src)
        if self.rank != src:
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
        self.broadcast(payload, src)
        return obj if self.rank == src else pickle.loads(payload.numpy().tobytes())

    def _wait(self, work: Any, what: str) -> None:
        try:
            work.wait(self.timeout)
        except RuntimeError as exc:  # gloo: timeout, or the peer's sockets closed (it exited or died)
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BridgeError(
                f"bridge rank {self.rank}: {what} failed within {self.timeout.total_seconds():.0f} s (the other side "
                f"stopped or died): {first_line}"
            ) from None

    def close(self) -> None:
        """Drop the group's sockets (the peer's pending ops then fail at once instead of waiting for the timeout)."""
        self.pg = None  # type: ignore[assignment]
