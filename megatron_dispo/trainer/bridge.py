"""Two worlds in one torchrun job: the training world, and a gloo bridge from training rank 0 to the rollout ranks.

Megatron's ``initialize_model_parallel`` builds its groups over the whole *default* world, so rollout-only ranks must
not be in it. With ``rollout.placement=dedicated`` the last ``rollout.num_ranks`` ranks of a job of W processes run only
engines, and:

- training ranks ``0..W-n-1`` start their default group over themselves only (:func:`init_training_world`), on a
  prefix of the job's rendezvous store (torchrun's agent store, or one hosted by global rank 0 without torchrun), so no
  second port has to be agreed on;
- training rank 0 and the rollout ranks form a bridge (``comm.StoreBridge``): a standalone gloo group on another
  prefix of the same store for host data, plus (on GPU) an NCCL one for the weights, used only through their own
  ops, so they are never registered in torch.distributed's world and cannot clash with a private vLLM world.

Every wait is bounded: gloo raises after the bridge's timeout, and a peer that died closes its sockets, which fails
the other side's pending op at once.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_dispo.comm.channel import BridgeError, StoreBridge
from megatron_dispo.comm.groups import register_group

__all__ = [
    "BridgeError",
    "JobLayout",
    "init_rollout_world",
    "init_training_world",
    "job_layout",
    "job_store",
    "open_bridges",
]


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
    register_group(dist.group.WORLD, "host", "rollout-world")  # gloo on GPU too: only host data between engines


def open_bridges(layout: JobLayout, store: dist.Store, timeout: timedelta) -> tuple[StoreBridge, StoreBridge]:
    """(host bridge, weight bridge) between training rank 0 and the rollout ranks (only they call this).

    The host bridge (gloo) carries messages and batches. Weights travel on their own device bridge: NCCL when CUDA is
    available (the buffers stay on the GPUs: the refit transport's broadcast), a gloo bridge standing in for it on CPU.
    """
    assert layout.bridge_rank is not None
    host = StoreBridge(store, layout.bridge_rank, layout.bridge_size, timeout, name="bridge")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    weights = StoreBridge(
        store, layout.bridge_rank, layout.bridge_size, timeout, backend=backend, name="bridge-weights", purpose="device"
    )
    return host, weights
