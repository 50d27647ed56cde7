"""The rollout batch of one step as packed tensors, and how it reaches every rank.

The engine rank turns its kept prompt groups into one :class:`StepBatch`: every sequence's prompt + response token
ids concatenated into one int64 tensor, the sampled tokens' engine log-probs into one float32 tensor, and per-sequence
lengths, correctness and finish reasons. Other ranks receive it through a handful of ``dist.broadcast`` calls (a
fixed-size header with the lengths first, then the payload tensors), so nothing is pickled per token and the cost is
a few collectives whatever the batch size. Per-sequence views (:attr:`StepBatch.prompts`, :attr:`StepBatch.responses`)
are slices of the packed tensors, not copies.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_dispo.rollout.batch import FINISH_REASONS

_HEADER_FIELDS = 3  # sequences, total tokens, total response tokens
_PER_SEQUENCE_FIELDS = 6  # prompt_lens, response_lens, correct, valid, finish_codes, policy_version


@dataclass(frozen=True)
class StepBatch:
    """The kept rollouts of one step: N sequences, G contiguous responses per prompt."""

    tokens: torch.Tensor
    """int64 [sum of prompt + response lengths]: each sequence's prompt ids followed by its response ids."""
    prompt_lens: torch.Tensor
    """int64 [N]."""
    response_lens: torch.Tensor
    """int64 [N]."""
    rollout_logprobs: torch.Tensor
    """float32 [sum of response lengths]: the engine's log-prob of each sampled token (behaviour policy)."""
    correct: torch.Tensor
    """bool [N]: verified correct and not repetition-truncated."""
    valid: torch.Tensor
    """bool [N]: False for samples the verifier-failure policy drops from their group."""
    finish_codes: torch.Tensor
    """int8 [N]: index into :data:`FINISH_REASONS`."""
    policy_version: torch.Tensor | None = None
    """int64 [N]: updates the generating policy had completed (dedicated rollout ranks); None means all 0."""

    def __post_init__(self) -> None:
        if self.policy_version is None:
            object.__setattr__(self, "policy_version", torch.zeros(self.num_sequences, dtype=torch.int64))

    @classmethod
    def from_sequences(
        cls,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        rollout_logprobs: Sequence[Sequence[float]],
        correct: Sequence[bool],
        finish_reasons: Sequence[str],
        valid: Sequence[bool] | None = None,
    ) -> StepBatch:
        """Pack per-sequence lists (what the engine returns) into the tensors of a batch."""
        count = len(responses)
        if not (len(prompts) == len(rollout_logprobs) == len(correct) == len(finish_reasons) == count):
            raise ValueError("prompts, responses, rollout_logprobs, correct and finish_reasons differ in length.")
        for index, (ids, logprobs) in enumerate(zip(responses, rollout_logprobs, strict=True)):
            if len(ids) != len(logprobs):
                raise ValueError(f"sequence {index}: {len(ids)} response tokens but {len(logprobs)} log-probs.")
        flat_tokens = [t for p, r in zip(prompts, responses, strict=True) for t in (*p, *r)]
        return cls(
            tokens=torch.tensor(flat_tokens, dtype=torch.int64),
            prompt_lens=torch.tensor([len(p) for p in prompts], dtype=torch.int64),
            response_lens=torch.tensor([len(r) for r in responses], dtype=torch.int64),
            rollout_logprobs=torch.tensor([v for lp in rollout_logprobs for v in lp], dtype=torch.float32),
            correct=torch.tensor(list(correct), dtype=torch.bool),
            valid=torch.tensor(list(valid) if valid is not None else [True] * count, dtype=torch.bool),
            finish_codes=torch.tensor([FINISH_REASONS.index(f) for f in finish_reasons], dtype=torch.int8),
        )

    @property
    def num_sequences(self) -> int:
        return int(self.response_lens.numel())

    @functools.cached_property
    def prompts(self) -> list[torch.Tensor]:
        """Each sequence's prompt ids (views into :attr:`tokens`)."""
        return list(self._split_tokens[0::2])

    @functools.cached_property
    def responses(self) -> list[torch.Tensor]:
        """Each sequence's response ids (views into :attr:`tokens`)."""
        return list(self._split_tokens[1::2])

    def rollout_logprobs_per_sequence(self) -> list[torch.Tensor]:
        """Each sequence's engine log-probs (views into :attr:`rollout_logprobs`)."""
        return list(torch.split(self.rollout_logprobs, self.response_lens.tolist()))

    def finish_reasons(self) -> list[str]:
        return [FINISH_REASONS[int(code)] for code in self.finish_codes]

    @functools.cached_property
    def _split_tokens(self) -> tuple[torch.Tensor, ...]:
        """prompt 0, response 0, prompt 1, response 1, ... as views."""
        return torch.split(self.tokens, torch.stack([self.prompt_lens, self.response_lens], dim=1).reshape(-1).tolist())


def broadcast_step_batch(batch: StepBatch | None, *, src: int = 0, group: dist.ProcessGroup | None = None) -> StepBatch:
    """``src``'s batch on every rank of ``group``: one header broadcast, then one broadcast per packed tensor.

    ``batch`` is read on ``src`` only (other ranks pass None). Single-process runs return it unchanged.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        if batch is None:
            raise ValueError("broadcast_step_batch: the source rank must pass its batch.")
        return batch
    is_src = dist.get_rank() == src
    if is_src and batch is None:
        raise ValueError("broadcast_step_batch: the source rank must pass its batch.")
    header = torch.zeros(_HEADER_FIELDS, dtype=torch.int64)
    if is_src:
        assert batch is not None
        header[:] = torch.tensor([batch.num_sequences, batch.tokens.numel(), batch.rollout_logprobs.numel()])
    dist.broadcast(header, src=src, group=group)
    count, num_tokens, num_response_tokens = header.tolist()
    # every per-sequence field travels in one int64 tensor (pack_per_sequence)
    per_sequence = torch.empty((_PER_SEQUENCE_FIELDS, count), dtype=torch.int64)
    tokens = torch.empty(num_tokens, dtype=torch.int64)
    logprobs = torch.empty(num_response_tokens, dtype=torch.float32)
    if is_src:
        assert batch is not None
        per_sequence = pack_per_sequence(batch)
        tokens, logprobs = batch.tokens, batch.rollout_logprobs
    for tensor in (per_sequence, tokens, logprobs):
        dist.broadcast(tensor, src=src, group=group)
    if is_src:
        assert batch is not None
        return batch
    return unpack_step_batch(tokens, per_sequence, logprobs)


def pack_per_sequence(batch: StepBatch) -> torch.Tensor:
    """Every per-sequence field in one int64 tensor [6, N]: prompt/response lengths, correct, valid, finish, version."""
    flags = (batch.correct, batch.valid, batch.finish_codes)
    assert batch.policy_version is not None
    return torch.stack([batch.prompt_lens, batch.response_lens, *(f.long() for f in flags), batch.policy_version])


def unpack_step_batch(tokens: torch.Tensor, per_sequence: torch.Tensor, logprobs: torch.Tensor) -> StepBatch:
    """Inverse of :func:`pack_per_sequence` plus the two packed payload tensors."""
    return StepBatch(
        tokens=tokens,
        prompt_lens=per_sequence[0].clone(),
        response_lens=per_sequence[1].clone(),
        rollout_logprobs=logprobs,
        correct=per_sequence[2].bool(),
        valid=per_sequence[3].bool(),
        finish_codes=per_sequence[4].to(torch.int8),
        policy_version=per_sequence[5].clone(),
    )
