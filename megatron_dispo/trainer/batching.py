"""Turning a rollout batch into the mini-batches and micro-batches of the update phase.

The rollout batch (paper: 512 prompts x G=16 responses) is split into K mini-batches of whole groups (paper: 16 of 32
prompts); each mini-batch is one optimizer step. A mini-batch is sharded over data-parallel ranks (whole groups again)
and each rank's share is packed into micro-batches under a padded-token budget for memory.

Token-mean losses divide by ``num_global_tokens``: the number of response tokens of the whole mini-batch over every
micro-batch and every DP rank. It is known before the first micro-batch runs (it is the sum of response lengths), so
the per-micro-batch losses add up to the full mini-batch loss exactly, whatever the split.

Tensor alignment: sequences are ``prompt + response`` token ids, right-padded to ``T``. Per-token tensors are
``[n, T - 1]`` and *target aligned*: column ``j`` is about token ``input_ids[:, j + 1]`` predicted from the prefix
``input_ids[:, : j + 1]``. ``response_mask[:, j]`` is 1 when that target token is a response token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MicroBatch:
    """Padded tensors of a few sequences, ready for a forward pass."""

    indices: tuple[int, ...]
    """Positions of these sequences in the rollout batch."""
    input_ids: torch.Tensor
    """[n, T] prompt + response ids, right-padded with ``pad_token_id``."""
    response_mask: torch.Tensor
    """[n, T-1] float, 1 where the target token is a response token."""
    old_logprobs: torch.Tensor | None
    """[n, T-1] log pi_old of the target tokens (0 outside the response), once computed."""
    advantages: torch.Tensor | None
    """[n] per-sequence advantage."""

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum().item())


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


def build_microbatch(
    indices: Sequence[int],
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    old_logprobs: Sequence[Sequence[float]] | Mapping[int, Sequence[float]] | None = None,
    advantages: torch.Tensor | None = None,
    pad_to_multiple_of: int = 1,
) -> MicroBatch:
    """Pad the chosen sequences into tensors; ``old_logprobs[i]`` holds one value per response token of sequence i
    (a list indexed by sequence, or a mapping holding at least the chosen sequences)."""
    lengths = [len(prompt_ids[i]) + len(response_ids[i]) for i in indices]
    width = max(lengths)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    n = len(indices)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width - 1), dtype=torch.float32)
    old = torch.zeros((n, width - 1), dtype=torch.float32) if old_logprobs is not None else None
    for row, index in enumerate(indices):
        prompt = torch.as_tensor(prompt_ids[index], dtype=torch.long)
        response = torch.as_tensor(response_ids[index], dtype=torch.long)
        if prompt.numel() == 0:
            raise ValueError(f"sequence {index} has an empty prompt; every response needs at least one prompt token.")
        tokens = torch.cat([prompt, response])
        input_ids[row, : len(tokens)] = tokens
        start, stop = len(prompt) - 1, len(tokens) - 1  # target j predicts token j + 1
        mask[row, start:stop] = 1.0
        if old is not None:
            values = old_logprobs[index]
            if len(values) != len(response):
                raise ValueError(
                    f"old_logprobs of sequence {index} has {len(values)} values for {len(response)} response tokens."
                )
            old[row, start:stop] = torch.as_tensor(values, dtype=torch.float32)
    adv = advantages[list(indices)].to(torch.float32) if advantages is not None else None
    return MicroBatch(tuple(indices), input_ids, mask, old, adv)


def response_token_count(indices: Sequence[int], response_ids: Sequence[Sequence[int]]) -> int:
    """num_global_tokens of a mini-batch: response tokens over all its sequences (every micro-batch, every DP rank)."""
    return sum(len(response_ids[i]) for i in indices)


def exclude_dropped(batch: MicroBatch, valid: torch.Tensor) -> None:
    """Zero the response mask of rows whose sequence was dropped (``valid[index]`` False, from
    ``reward.on_verifier_failure=drop``): they then weigh nothing in the loss and its telemetry."""
    batch.response_mask[~valid[list(batch.indices)]] = 0.0
