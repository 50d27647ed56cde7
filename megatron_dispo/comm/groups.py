"""Process groups named for what they carry.

On a GPU job the default group and Megatron's model-parallel groups are NCCL: they move tensors that live on the
GPU and nothing else (NCCL has no CPU collectives). Rollout batches, metrics, refit reports and control objects live
on the host, so they travel over gloo groups created for that purpose. Every group the project uses is registered
here with its purpose and a name, so a reader (and ``tests/trainer/test_collectives.py``) can tell which is which.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch.distributed as dist

GroupPurpose = Literal["host", "device"]

__all__ = [
    "GroupPurpose",
    "GroupRole",
    "group_purpose",
    "host_world_group",
    "init_host_world",
    "new_host_group",
    "register_group",
]


@dataclass(frozen=True)
class GroupRole:
    """What a registered group is for: ``purpose`` decides what may travel on it, ``name`` is for people."""

    purpose: GroupPurpose
    name: str


_ROLES: dict[int, tuple[Any, GroupRole]] = {}  # id(group) -> (group, role); the group is kept so ids stay unique
_HOST_WORLD: list[Any] = []


def register_group(group: Any, purpose: GroupPurpose, name: str) -> Any:
    """Record ``group``'s purpose; returns the group. ``None`` (no group, one process) is returned as is.

    A group keeps its first role: naming it again for the other purpose is a bug, reported here."""
    if group is None:
        return group
    role = group_purpose(group)
    if role is not None and role.purpose != purpose:
        raise ValueError(f"group '{role.name}' carries {role.purpose} data; it cannot also be '{name}' for {purpose}.")
    if role is None:
        _ROLES[id(group)] = (group, GroupRole(purpose, name))
    return group


def group_purpose(group: Any) -> GroupRole | None:
    """The registered role of ``group`` (``None`` = the default group), or None when it was never registered."""
    if group is None:
        group = dist.group.WORLD if dist.is_initialized() else None
    entry = _ROLES.get(id(group))
    return entry[1] if entry is not None and entry[0] is group else None


def new_host_group(ranks: list[int] | None, name: str, timeout: timedelta | None = None) -> Any:
    """A gloo group over ``ranks`` (all ranks when None) registered as ``host``; collective over the default world."""
    kwargs: dict[str, Any] = {"backend": "gloo"}
    if timeout is not None:
        kwargs["timeout"] = timeout
    return register_group(dist.new_group(ranks, **kwargs), "host", name)


def init_host_world(timeout: timedelta | None = None) -> Any:
    """The host group over the whole default world, created once (every rank must call this at the same point).

    The default group is registered as the ``device`` world: on GPU it is NCCL.
    """
    if not dist.is_initialized():
        return None
    if not _HOST_WORLD:
        register_group(dist.group.WORLD, "device", "world")
        _HOST_WORLD.append(new_host_group(None, "host-world", timeout))
    return _HOST_WORLD[0]


def host_world_group() -> Any:
    """The host world of :func:`init_host_world`; an error if it was never made (a bug, not a user's mistake)."""
    if not _HOST_WORLD:
        raise RuntimeError("init_host_world() was not called on this rank before the first host collective.")
    return _HOST_WORLD[0]


def forget_groups() -> None:
    """Drop every registration (the process groups are being destroyed)."""
    _ROLES.clear()
    _HOST_WORLD.clear()


def host_mirror(ranks: list[int], name: str, timeout: timedelta | None = None) -> Any:
    """A host (gloo) group over the same ranks as one of this rank's device groups.

    Collective over the default world: every rank offers the ranks of its own group, and each distinct group is
    created once, in the same order on every rank (``dist.new_group`` must be called by all ranks alike).
    """
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(ranks), group=host_world_group())
    mine = None
    for group_ranks in sorted({tuple(r) for r in everyone}):
        group = new_host_group(list(group_ranks), name, timeout)
        if dist.get_rank() in group_ranks:
            mine = group
    return mine
