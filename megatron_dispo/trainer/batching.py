"""Turning a rollout batch into the mini-batches and micro-batches of the update phase.

The rollout batch (paper: 512 prompts x G=16 responses) is split into K mini-batches of whole groups (paper: 16 of 32
prompts); each mini-batch is one optimizer step. A mini-batch is sharded over data-parallel ranks (whole groups again)
and each rank's share is packed into micro-batches under a padded-token budget for memory.

Token-mean losses divide by ``num_global_tokens``: the number of response tokens of the whole mini-batch over every
micro-batch and every DP rank. It is known before the first micro-batch runs (it is the sum of response lengths), so
the per-micro-batch losses add up to the full mini-batch loss exactly, whatever the split.

The micro-batch itself (:class:`MicroBatch`, :func:`build_microbatch`, tensor alignment) is the policy's input type
and lives in ``models/microbatch.py``; it is re-exported here for the trainer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_dispo.models.microbatch import MicroBatch, build_microbatch

__all__ = [
    "MicroBatch",
    "build_microbatch",
    "exclude_dropped",
    "pack_microbatches",
    "response_token_count",
    "shard_for_data_parallel",
    "split_minibatches",
]


def split_minibatches(num_sequences: int, group_size: int, num_minibatches: int) -> list[list[int]]:
    """Split ``num_sequences`` (contiguous groups of ``group_size``) into ``num_minibatches`` runs of whole groups."""
    if group_size < 1 or num_sequences % group_size:
        raise ValueError(
            f"num_sequences={num_sequences} must be a positive multiple of group_size={group_size} "
            "(responses of one prompt are contiguous)."
        )
    num_groups = num_sequences // group_size
    if num_minibatches < 1 or num_groups % num_minibatches:
        raise ValueError(
            f"the rollout batch has {num_groups} prompt groups, which do not split into num_minibatches="
            f"{num_minibatches} equal mini-batches; choose a divisor of {num_groups}."
        )
    groups_per_minibatch = num_groups // num_minibatches
    size = groups_per_minibatch * group_size
    return [list(range(start, start + size)) for start in range(0, num_sequences, size)]


def shard_for_data_parallel(indices: Sequence[int], group_size: int, dp_rank: int, dp_size: int) -> list[int]:
    """This DP rank's contiguous share of whole groups of a mini-batch."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size}).")
    num_groups = len(indices) // group_size
    if len(indices) % group_size or num_groups % dp_size:
        raise ValueError(
            f"a mini-batch of {num_groups} groups cannot be shared equally by {dp_size} data-parallel ranks; make "
            "prompts per mini-batch a multiple of the data-parallel size."
        )
    per_rank = num_groups // dp_size * group_size
    return list(indices[dp_rank * per_rank : (dp_rank + 1) * per_rank])


def pack_microbatches(
    indices: Sequence[int], sequence_lengths: Sequence[int], max_tokens_per_microbatch: int
) -> list[list[int]]:
    """Greedy packing in order: a micro-batch grows while ``count x longest`` stays within the padded-token budget.

    Order is kept (no sorting) so results do not depend on the budget beyond float summation order. A sequence longer
    than the budget gets a micro-batch of its own rather than an error: the budget is a memory target, not a limit.
    """
    if max_tokens_per_microbatch < 1:
        raise ValueError(f"max_tokens_per_microbatch={max_tokens_per_microbatch} must be >= 1.")
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in indices:
        length = int(sequence_lengths[index])
        if current and max(longest, length) * (len(current) + 1) > max_tokens_per_microbatch:
            batches.append(current)
            current, longest = [], 0
        current.append(index)
        longest = max(longest, length)
    if current:
        batches.append(current)
    return batches


def response_token_count(indices: Sequence[int], response_ids: Sequence[Sequence[int]]) -> int:
    """num_global_tokens of a mini-batch: response tokens over all its sequences (every micro-batch, every DP rank)."""
    return sum(len(response_ids[i]) for i in indices)


def exclude_dropped(batch: MicroBatch, valid: torch.Tensor) -> None:
    """Zero the response mask of rows whose sequence was dropped (``valid[index]`` False, from
    ``reward.on_verifier_failure=drop``): they then weigh nothing in the loss and its telemetry."""
    batch.response_mask[~valid[list(batch.indices)]] = 0.0
