"""Where rollout work runs: which ranks form each engine replica, and which replica generates which prompt groups.

Pure functions (no torch.distributed, no vLLM) so the layout and the deal are tested on their own.

* A replica is ``tensor_parallel_size`` consecutive ranks of one node; the world holds ``world / tensor_parallel_size``
  replicas. Engine TP is independent of Megatron's TP/EP/PP: the trainer's layout is not consulted.
* Prompt groups are dealt whole (the G samples of a prompt share its prefix cache and its reward normalisation),
  balanced by expected tokens with longest-processing-time-first greedy.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ReplicaPlacement:
    """One rank's place in the rollout layout."""

    rank: int
    """This rank's global rank."""
    replica_index: int
    """Index of the replica this rank belongs to, in [0, num_replicas)."""
    num_replicas: int
    """Number of engine replicas in the world."""
    ranks: tuple[int, ...]
    """Global ranks of this rank's replica, ascending; the first is the replica leader."""
    master_port: int | None = None
    """TCP port of the replica's own vLLM world (engine TP > 1 only); picked by the leader when the engines start."""

    @property
    def tensor_parallel_size(self) -> int:
        """Engine TP of the replica (its number of ranks)."""
        return len(self.ranks)

    @property
    def local_rank(self) -> int:
        """This rank's position inside its replica (its rank in the replica's vLLM world)."""
        return self.ranks.index(self.rank)

    @property
    def is_leader(self) -> bool:
        """True on the replica's first rank: the one that returns the replica's outputs."""
        return self.rank == self.ranks[0]

    @property
    def leaders(self) -> tuple[int, ...]:
        """Global rank of every replica's leader, by replica index."""
        size = self.tensor_parallel_size
        return tuple(index * size for index in range(self.num_replicas))


def place_replicas(rank: int, world_size: int, tensor_parallel_size: int, gpus_per_node: int) -> ReplicaPlacement:
    """The replica of ``rank``: consecutive blocks of ``tensor_parallel_size`` ranks, never across a node boundary.

    ``gpus_per_node`` is the number of ranks per node (torchrun's ``LOCAL_WORLD_SIZE``); engine TP must divide it so
    that a replica's ranks share one host (vLLM's TP world of a replica talks over that host's shared memory).
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1.")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size}).")
    if tensor_parallel_size < 1:
        raise ValueError(f"rollout.tensor_parallel_size={tensor_parallel_size} must be >= 1.")
    if gpus_per_node < 1 or world_size % gpus_per_node != 0:
        raise ValueError(
            f"gpus_per_node={gpus_per_node} must be >= 1 and divide world_size={world_size} (every node runs the same "
            "number of ranks); pass the ranks per node (torchrun's LOCAL_WORLD_SIZE)."
        )
    if gpus_per_node % tensor_parallel_size != 0:
        raise ValueError(
            f"rollout.tensor_parallel_size={tensor_parallel_size} must divide the ranks per node ({gpus_per_node}): "
            "an engine replica never spans two nodes; use a divisor of gpus_per_node."
        )
    index = rank // tensor_parallel_size
    first = index * tensor_parallel_size
    return ReplicaPlacement(
        rank=rank,
        replica_index=index,
        num_replicas=world_size // tensor_parallel_size,
        ranks=tuple(range(first, first + tensor_parallel_size)),
    )


def deal_groups(costs: Sequence[int], num_replicas: int) -> list[list[int]]:
    """Deal prompt groups (by index) to replicas, whole, balancing the summed ``costs`` (longest first, greedy).

    ``costs[g]`` is the expected work of group ``g`` (e.g. ``n * (prompt_len + max_new_tokens)``). Groups are taken in
    decreasing cost (ties: lower index first) and each goes to the replica with the least load so far (ties: lower
    replica index), which keeps the largest load within 4/3 of the optimum. Returns, per replica, its group indices
    in ascending order; a replica may get none. Deterministic: every rank computes the same deal.
    """
    if num_replicas < 1:
        raise ValueError(f"num_replicas={num_replicas} must be >= 1.")
    for index, cost in enumerate(costs):
        if cost < 0:
            raise ValueError(f"costs[{index}]={cost} must be >= 0.")
    shares: list[list[int]] = [[] for _ in range(num_replicas)]
    loads = [(0, replica) for replica in range(num_replicas)]  # a heap of (load, replica)
    for group in sorted(range(len(costs)), key=lambda g: (-costs[g], g)):
        load, replica = heapq.heappop(loads)
        shares[replica].append(group)
        heapq.heappush(loads, (load + costs[group], replica))
    return [sorted(share) for share in shares]
