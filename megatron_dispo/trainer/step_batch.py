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
from megatron_dispo.rollout.routing_capture import NO_ROUTE

_HEADER_FIELDS = 5  # sequences, total tokens, total response tokens, routed MoE layers, routed top-k
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
    routed_experts: torch.Tensor | None = None
    """int16 [sum of prompt + response lengths, moe_layers, top_k], row-aligned with :attr:`tokens`: the experts the
    engine routed each input token to (``NO_ROUTE`` = -1 where unrecorded, always for a sequence's last token, which
    the engine never fed back). None unless the engine captured routing (MoE routing replay)."""

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
        routed_experts: Sequence[torch.Tensor] | None = None,
    ) -> StepBatch:
        """Pack per-sequence lists (what the engine returns) into the tensors of a batch; ``routed_experts[i]`` is
        ``RolloutBatch.routed_experts``' ``[prompt + response - 1, layers, k]`` of sequence i."""
        count = len(responses)
        if not (len(prompts) == len(rollout_logprobs) == len(correct) == len(finish_reasons) == count):
            raise ValueError("prompts, responses, rollout_logprobs, correct and finish_reasons differ in length.")
        for index, (ids, logprobs) in enumerate(zip(responses, rollout_logprobs, strict=True)):
            if len(ids) != len(logprobs):
                raise ValueError(f"sequence {index}: {len(ids)} response tokens but {len(logprobs)} log-probs.")
        flat_tokens = [t for p, r in zip(prompts, responses, strict=True) for t in (*p, *r)]
        return cls(
            routed_experts=_pack_routed(routed_experts, prompts, responses) if routed_experts is not None else None,
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

    def routed_experts_per_sequence(self) -> list[torch.Tensor] | None:
        """Each sequence's engine routing ``[prompt + response, layers, k]`` (views), or None without routing."""
        if self.routed_experts is None:
            return None
        return list(torch.split(self.routed_experts, (self.prompt_lens + self.response_lens).tolist()))

    def finish_reasons(self) -> list[str]:
        return [FINISH_REASONS[int(code)] for code in self.finish_codes]

    @functools.cached_property
    def _split_tokens(self) -> tuple[torch.Tensor, ...]:
        """prompt 0, response 0, prompt 1, response 1, ... as views."""
        return torch.split(self.tokens, torch.stack([self.prompt_lens, self.response_lens], dim=1).reshape(-1).tolist())


def _pack_routed(
    routed: Sequence[torch.Tensor], prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]
) -> torch.Tensor:
    """Per-sequence ``[n_i - 1, L, k]`` routing -> one int16 tensor row-aligned with the packed tokens."""
    if len(routed) != len(responses):
        raise ValueError(f"routed_experts has {len(routed)} entries for {len(responses)} sequences.")
    if not routed:
        return torch.zeros((0, 0, 0), dtype=torch.int16)
    pieces = []
    for index, (rows, prompt, response) in enumerate(zip(routed, prompts, responses, strict=True)):
        tokens = len(prompt) + len(response)
        if rows.dim() != 3 or rows.shape[0] != tokens - 1:
            raise ValueError(f"sequence {index}: routed_experts {tuple(rows.shape)}, expected [{tokens - 1}, L, k].")
        pieces.append(torch.cat([rows.to(torch.int16), torch.full((1, *rows.shape[1:]), NO_ROUTE, dtype=torch.int16)]))
    return torch.cat(pieces)


def routed_shape(batch: StepBatch) -> tuple[int, int]:
    """(MoE layers, top-k) of the batch's routing; (0, 0) without routing."""
    if batch.routed_experts is None:
        return 0, 0
    return int(batch.routed_experts.shape[1]), int(batch.routed_experts.shape[2])


def routed_bytes(batch: StepBatch) -> torch.Tensor | None:
    """The routing as uint8 bytes for collectives (neither gloo nor NCCL moves int16); see :func:`routed_buffer`."""
    return None if batch.routed_experts is None else batch.routed_experts.contiguous().view(torch.uint8)


def routed_buffer(num_tokens: int, layers: int, top_k: int) -> torch.Tensor | None:
    """Receive buffer for :func:`routed_bytes` (``.view(torch.int16)`` it after the transfer); None for no routing."""
    return torch.empty((num_tokens, layers, 2 * top_k), dtype=torch.uint8) if layers else None


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
        header[:] = torch.tensor(
            [batch.num_sequences, batch.tokens.numel(), batch.rollout_logprobs.numel(), *routed_shape(batch)]
        )
    dist.broadcast(header, src=src, group=group)
    count, num_tokens, num_response_tokens, layers, top_k = header.tolist()
    # every per-sequence field travels in one int64 tensor (pack_per_sequence)
    per_sequence = torch.empty((_PER_SEQUENCE_FIELDS, count), dtype=torch.int64)
    tokens = torch.empty(num_tokens, dtype=torch.int64)
    logprobs = torch.empty(num_response_tokens, dtype=torch.float32)
    routed = routed_buffer(num_tokens, layers, top_k)
    if is_src:
        assert batch is not None
        per_sequence = pack_per_sequence(batch)
        tokens, logprobs, routed = batch.tokens, batch.rollout_logprobs, routed_bytes(batch)
    for tensor in (per_sequence, tokens, logprobs, routed):
        if tensor is not None:
            dist.broadcast(tensor, src=src, group=group)
    if is_src:
        assert batch is not None
        return batch
    return unpack_step_batch(tokens, per_sequence, logprobs, None if routed is None else routed.view(torch.int16))


def pack_per_sequence(batch: StepBatch) -> torch.Tensor:
    """Every per-sequence field in one int64 tensor [6, N]: prompt/response lengths, correct, valid, finish, version."""
    flags = (batch.correct, batch.valid, batch.finish_codes)
    assert batch.policy_version is not None
    return torch.stack([batch.prompt_lens, batch.response_lens, *(f.long() for f in flags), batch.policy_version])


def unpack_step_batch(
    tokens: torch.Tensor, per_sequence: torch.Tensor, logprobs: torch.Tensor, routed: torch.Tensor | None = None
) -> StepBatch:
    """Inverse of :func:`pack_per_sequence` plus the packed payload tensors."""
    return StepBatch(
        tokens=tokens,
        prompt_lens=per_sequence[0].clone(),
        response_lens=per_sequence[1].clone(),
        rollout_logprobs=logprobs,
        correct=per_sequence[2].bool(),
        valid=per_sequence[3].bool(),
        finish_codes=per_sequence[4].to(torch.int8),
        policy_version=per_sequence[5].clone(),
        routed_experts=routed,
    )
