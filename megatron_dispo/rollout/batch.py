"""The result of one rollout call: G responses per prompt with their sampled-token log-probs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

FinishReason = Literal["stop", "length", "repetition"]
FINISH_REASONS: tuple[FinishReason, ...] = get_args(FinishReason)
"""Every finish reason, in the order whose indices are the finish codes sent between ranks as tensors."""


@dataclass
class RolloutBatch:
    """Responses of one ``RolloutEngine.generate`` call, grouped: the G responses of prompt p are contiguous.

    Response ``i`` answers prompt ``prompt_ids[group_index[i]]``. ``response_logprobs[i][t]`` is the log-prob of
    ``response_ids[i][t]`` under the sampling distribution (after temperature / top-p: vLLM ``processed_logprobs``),
    i.e. the behaviour policy's log-prob. A response stopped by repetition truncation excludes the forced stop token.
    """

    prompt_ids: list[list[int]]
    """Prompt token ids, one entry per prompt."""
    response_ids: list[list[int]]
    """Generated token ids, one entry per response (P * G), including the model's own stop token if it emitted one."""
    response_logprobs: list[list[float]]
    """Log-prob of each generated token under the sampling distribution."""
    finish_reason: list[FinishReason]
    """``stop`` (stop token), ``length`` (max_new_tokens) or ``repetition`` (loop detected and truncated)."""
    group_index: list[int]
    """Prompt index of each response: [0]*G + [1]*G + ..."""
    group_size: int
    """G, the number of responses per prompt."""
    texts: list[str]
    """Decoded responses (special tokens kept out)."""
    stats: dict[str, float] = field(default_factory=dict)
    """``rollout/...`` counters: tokens, seconds, tokens_per_s, finish counts, repetition hits by kind."""
    routed_experts: list[torch.Tensor] | None = None
    """MoE routing replay: per response, int16 ``[len(prompt) + len(response) - 1, moe_layers, top_k]`` experts the
    engine routed input token ``j`` of ``prompt + response`` to (-1: not recorded); None unless
    ``RolloutConfig.capture_routed_experts``. See ``rollout/routing_capture.py``."""

    @property
    def response_lengths(self) -> list[int]:
        """Number of generated tokens of each response."""
        return [len(ids) for ids in self.response_ids]

    @property
    def num_responses(self) -> int:
        return len(self.response_ids)

    def __post_init__(self) -> None:
        count = len(self.response_ids)
        for name in ("response_logprobs", "finish_reason", "group_index", "texts"):
            if len(getattr(self, name)) != count:
                raise ValueError(f"RolloutBatch.{name} has {len(getattr(self, name))} entries, expected {count}.")
        if count != len(self.prompt_ids) * self.group_size:
            raise ValueError(
                f"RolloutBatch has {count} responses for {len(self.prompt_ids)} prompts x group_size {self.group_size}."
            )
        for i, (ids, logprobs) in enumerate(zip(self.response_ids, self.response_logprobs, strict=True)):
            if len(ids) != len(logprobs):
                raise ValueError(f"response {i}: {len(ids)} tokens but {len(logprobs)} log-probs.")
        if self.routed_experts is not None:
            if len(self.routed_experts) != count:
                raise ValueError(
                    f"RolloutBatch.routed_experts has {len(self.routed_experts)} entries, expected {count}."
                )
            for i, routed in enumerate(self.routed_experts):
                tokens = len(self.prompt_ids[self.group_index[i]]) + len(self.response_ids[i]) - 1
                if routed.dim() != 3 or routed.shape[0] != tokens:
                    raise ValueError(f"response {i}: routed_experts {tuple(routed.shape)}, expected [{tokens}, L, k].")
