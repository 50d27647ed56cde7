"""The rollout batch of one step as packed tensors, and how it reaches every rank.

The engine rank turns its kept prompt groups into one :class:`StepBatch`: every sequence's prompt + response token
ids concatenated into one int64 tensor, the sampled tokens' engine log-probs into one float32 tensor, and per-sequence
lengths, correctness and finish reasons. Each field is a declared column (``column(rows)``): the table codec
(``comm.codec``) carries all of them in one header and one byte buffer over any channel, a training group or the
bridge from the rollout ranks, so a new per-token field is one line here. Per-sequence views (:attr:`StepBatch.prompts`,
:attr:`StepBatch.responses`) are slices of the packed tensors, not copies.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megatron_dispo.comm.channel import Channel
from megatron_dispo.comm.codec import Column, broadcast_table, recv_table, send_table
from megatron_dispo.rollout.batch import FINISH_REASONS
from megatron_dispo.rollout.routing_capture import NO_ROUTE


def column(rows: str) -> dict[str, Column]:
    """Field metadata of a StepBatch column (a field that travels): ``rows`` says what its first dimension counts."""
    return {"column": Column(rows)}  # type: ignore[arg-type]


@dataclass(frozen=True)
class StepBatch:
    """The kept rollouts of one step: N sequences, G contiguous responses per prompt."""

    tokens: torch.Tensor = field(metadata=column("token"))
    """int64 [sum of prompt + response lengths]: each sequence's prompt ids followed by its response ids."""
    prompt_lens: torch.Tensor = field(metadata=column("sequence"))
    """int64 [N]."""
    response_lens: torch.Tensor = field(metadata=column("sequence"))
    """int64 [N]."""
    rollout_logprobs: torch.Tensor = field(metadata=column("response_token"))
    """float32 [sum of response lengths]: the engine's log-prob of each sampled token (behaviour policy)."""
    correct: torch.Tensor = field(metadata=column("sequence"))
    """bool [N]: verified correct and not repetition-truncated."""
    valid: torch.Tensor = field(metadata=column("sequence"))
    """bool [N]: False for samples the verifier-failure policy drops from their group."""
    finish_codes: torch.Tensor = field(metadata=column("sequence"))
    """int8 [N]: index into :data:`FINISH_REASONS`."""
    policy_version: torch.Tensor | None = field(default=None, metadata=column("sequence"))
    """int64 [N]: updates the generating policy had completed (dedicated rollout ranks); None means all 0."""
    token_version: torch.Tensor | None = field(default=None, metadata=column("response_token"))
    """int64 [sum of response lengths]: the policy version that sampled each response token (partial rollouts: a
    response continued across batches mixes versions); None means every token has its sequence's version."""
    routed_experts: torch.Tensor | None = field(default=None, metadata=column("token"))
    """int16 [sum of prompt + response lengths, moe_layers, top_k], row-aligned with :attr:`tokens`: the experts the
    engine routed each input token to (``NO_ROUTE`` = -1 where unrecorded, always for a sequence's last token, which
    the engine never fed back). None unless the engine captured routing (MoE routing replay)."""

    local_routing: dict[int, torch.Tensor] | None = field(default=None, compare=False)
    """On a rank that received only its own sequences' routing (:func:`deliver_routing`): sequence index ->
    ``[prompt + response, layers, k]``. Not a column: it never travels as part of the batch."""

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
        token_versions: Sequence[Sequence[int]] | None = None,
        start_versions: Sequence[int] | None = None,
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
            **(_pack_versions(token_versions, start_versions, responses) if token_versions is not None else {}),
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

    def token_lags_per_sequence(self, trainer_version: int) -> list[torch.Tensor]:
        """Each response token's version lag behind ``trainer_version`` (its pi_old's version): from
        :attr:`token_version` under partial rollouts, else its sequence's :attr:`policy_version`."""
        if self.token_version is not None:
            return list(torch.split(trainer_version - self.token_version, self.response_lens.tolist()))
        assert self.policy_version is not None
        lags = (trainer_version - self.policy_version).tolist()
        return [torch.full((int(n),), lag, dtype=torch.int64) for n, lag in zip(self.response_lens, lags, strict=True)]

    def routed_experts_per_sequence(self) -> Sequence[torch.Tensor] | dict[int, torch.Tensor] | None:
        """Each sequence's engine routing ``[prompt + response, layers, k]`` (views), or None without routing; on a
        rank that received only its own sequences' routing, those (by sequence index)."""
        if self.local_routing is not None:
            return self.local_routing
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


def _columns() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(StepBatch) if "column" in f.metadata)


def to_table(batch: StepBatch) -> dict[str, torch.Tensor | None]:
    """The batch's declared columns by name (what the codec carries)."""
    return {name: getattr(batch, name) for name in _columns()}


def from_table(table: dict[str, torch.Tensor | None]) -> StepBatch:
    """Inverse of :func:`to_table` (columns the sender did not know stay at their defaults)."""
    return StepBatch(**{name: table[name] for name in _columns() if name in table})


def broadcast_step_batch(
    batch: StepBatch | None, *, src: int, channel: Channel | None, without: tuple[str, ...] = ("routed_experts",)
) -> StepBatch:
    """``src``'s batch on every rank of ``channel`` (a host channel: the batch lives on the CPU); ``batch`` is read on
    ``src`` only. Columns in ``without`` stay on ``src`` (the routing reaches each rank with
    :func:`deliver_routing`: only its own sequences'). Without a channel (one process) it is returned as is."""
    if channel is None or channel.size == 1:
        if batch is None:
            raise ValueError("broadcast_step_batch: the source rank must pass its batch.")
        return batch
    table = None
    if batch is not None:
        table = {name: tensor for name, tensor in to_table(batch).items() if name not in without}
    table = broadcast_table(table, src, channel)
    return batch if channel.rank == src and batch is not None else from_table(table)


def send_step_batch(batch: StepBatch, dst: int, channel: Channel) -> None:
    """Point-to-point (the bridge from the rollout driver to training rank 0)."""
    send_table(to_table(batch), dst, channel)


def recv_step_batch(src: int, channel: Channel) -> StepBatch:
    return from_table(recv_table(src, channel))


def deliver_routing(
    batch: StepBatch, channel: Channel, src: int, sequences_of_rank: Sequence[Sequence[int]], num_experts: int
) -> StepBatch:
    """Each rank of ``channel`` gets the engine routing of the sequences it trains on, and nothing else.

    ``src`` holds the whole batch's routing; every other rank receives its sequences' rows as one-byte expert codes
    (two bytes with 256 experts or more: ``rollout.routing_payload``) and keeps them in
    :attr:`StepBatch.local_routing`. At 30B-A3B scale the routing of a step is tens of GB: broadcast whole, every rank
    would receive all of it, while a data-parallel rank trains on 1/DP of the sequences.
    """
    from megatron_dispo.rollout.routing_payload import decode_routing, encode_routing

    if channel.size == 1:
        return batch
    if channel.rank == src:
        routed = batch.routed_experts_per_sequence()
        assert routed is not None, "deliver_routing: the source rank holds no routing"
        for rank, indices in enumerate(sequences_of_rank):
            if rank != src and indices:
                payload = encode_routing([routed[i] for i in indices], num_experts)
                channel.send(torch.tensor([payload.numel()], dtype=torch.int64), rank)
                channel.send(payload, rank)
        return batch
    indices = list(sequences_of_rank[channel.rank])
    local: dict[int, torch.Tensor] = {}
    if indices:
        size = channel.recv(torch.zeros(1, dtype=torch.int64), src)
        payload = channel.recv(torch.empty(int(size.item()), dtype=torch.uint8), src)
        rows = (batch.prompt_lens[indices] + batch.response_lens[indices]).tolist()
        local = dict(zip(indices, decode_routing(payload, rows, num_experts), strict=True))
    return dataclasses.replace(batch, routed_experts=None, local_routing=local)


def _pack_versions(
    token_versions: Sequence[Sequence[int]], start_versions: Sequence[int] | None, responses: Sequence[Sequence[int]]
) -> dict[str, torch.Tensor]:
    """The ``token_version`` column, and each sequence's ``policy_version``: the version its first chunk was sampled
    by (its oldest token's; an empty response has no token to tell it)."""
    if start_versions is None or len(start_versions) != len(responses):
        raise ValueError("token_versions needs start_versions, one per sequence.")
    for index, (versions, ids) in enumerate(zip(token_versions, responses, strict=True)):
        if len(versions) != len(ids):
            raise ValueError(f"sequence {index}: {len(ids)} response tokens but {len(versions)} token versions.")
    return {
        "token_version": torch.tensor([v for versions in token_versions for v in versions], dtype=torch.int64),
        "policy_version": torch.tensor(list(start_versions), dtype=torch.int64),
    }
