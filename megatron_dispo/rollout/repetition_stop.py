"""Repetition early truncation inside vLLM's V1 model runner (the CPU engine): a logits processor that forces a stop
token on looping sequences. The GPU engine runs vLLM's V2 runner and :mod:`.repetition_stop_v2`.

Every ``check_every`` generated tokens the processor runs :func:`detect_repetition` on each opted-in request's
output so far. On a hit it records the hit (for the engine to read back) and, at the same decoding step, masks every
logit but the request's stop token, so the request ends at once. The engine then drops that forced token and reports
``finish_reason="repetition"``. A looping sequence is therefore stopped at most ``check_every + 1`` tokens after the
detector's evidence is complete. Under async scheduling vLLM appends ``-1`` placeholders to ``output_token_ids``
until the sampled ids are known; only the tokens before the first placeholder count.

Confidence (for the detector's ``confident_run`` rule) is tracked without copying the logits: at each step the
processor keeps each row's top token and its log-prob under the request's temperature, keyed by the output index the
sampled token will take; when that token is known, its log-prob is exact if it was the top token, and otherwise
bounded (:func:`.repetition_request.token_logprob`).
top-p is not taken into account (it only sharpens).

Requests opt in through ``SamplingParams.extra_args`` (:func:`.repetition_request.repetition_extra_args`), so one
engine can mix truncated and untruncated requests. Hits are handed back, keyed by uid, through the dict of the engine
that owns the processor (:meth:`RepetitionStopProcessor.reporting_to`): this needs the engine core in the caller's
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), which is how the rollout engine always runs vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from megatron_dispo.algorithms.repetition import detect_repetition
from megatron_dispo.rollout.repetition_request import (
    RecordedHit,
    RequestSpec,
    committed_tokens,
    repetition_extra_args,
    request_spec,
    token_logprob,
    validate_spec,
)

__all__ = ["RecordedHit", "RepetitionStopProcessor", "repetition_extra_args"]

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig


@dataclass
class _RequestState:
    spec: RequestSpec
    output_token_ids: Sequence[int]  # live reference to vLLM's list of generated tokens (placeholders included)
    token_logprobs: list[float] = field(default_factory=list)
    tops: dict[int, tuple[int, float]] = field(default_factory=dict)
    """Output index -> (top token, its log-prob) of the row that sampled it, until that token is known."""
    checked_len: int = 0
    forced: bool = False


class RepetitionStopProcessor(LogitsProcessor):
    """vLLM V1 logits processor implementing repetition early truncation (see the module docstring).

    vLLM builds the processor itself from its class, so an engine hands vLLM the class returned by
    :meth:`reporting_to`, whose instances record their hits into that engine's own dict.
    """

    hits: ClassVar[dict[str, RecordedHit] | None] = None
    """uid -> hit, filled by the processor, drained by the engine after each ``generate``; set by ``reporting_to``."""

    @classmethod
    def reporting_to(cls, hits: dict[str, RecordedHit]) -> type[RepetitionStopProcessor]:
        """A subclass whose instances record hits into ``hits`` (one per engine: the engine owns the dict)."""
        return type(cls.__name__, (cls,), {"hits": hits, "__module__": cls.__module__})

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        validate_spec(sampling_params)

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        if self.hits is None:
            raise TypeError("give vLLM RepetitionStopProcessor.reporting_to(hits), not the base class.")
        self._hits: dict[str, RecordedHit] = self.hits
        self.device = device
        self.states: dict[int, _RequestState] = {}

    def is_argmax_invariant(self) -> bool:
        """Forcing the stop token changes greedy decoding too."""
        return False

    def _record_new_token_logprobs(self) -> None:
        """Append the log-prob of each request's newly known token(s), from the top its row had when it was sampled."""
        for state in self.states.values():
            if not state.spec.track_confidence:
                continue
            tokens = committed_tokens(state.output_token_ids)
            for index in range(len(state.token_logprobs), len(tokens)):
                top = state.tops.pop(index, None)  # None: no logits seen for it (never "confident")
                state.token_logprobs.append(float("-inf") if top is None else token_logprob(tokens[index], *top))

    def _apply_batch_update(self, batch_update: BatchUpdate) -> None:
        for index in batch_update.removed:
            self.states.pop(index, None)
        for index, params, _prompt_ids, output_token_ids in batch_update.added:
            spec = request_spec(params)
            if spec is None:
                self.states.pop(index, None)
            else:
                self.states[index] = _RequestState(spec, output_token_ids)
        for a_index, b_index, direction in batch_update.moved:
            a_state, b_state = self.states.pop(a_index, None), self.states.pop(b_index, None)
            if a_state is not None:
                self.states[b_index] = a_state
            if direction == MoveDirectionality.SWAP and b_state is not None:
                self.states[a_index] = b_state

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self._record_new_token_logprobs()
        if batch_update is not None:
            self._apply_batch_update(batch_update)
        for state in self.states.values():
            tokens = committed_tokens(state.output_token_ids)
            generated = len(tokens)
            if state.forced or generated - state.checked_len < state.spec.config.check_every:
                continue
            state.checked_len = generated
            logprobs = state.token_logprobs[:generated] if state.spec.track_confidence else None
            hit = detect_repetition(list(tokens), state.spec.config, logprobs)
            if hit is not None:
                state.forced = True
                self._hits[state.spec.uid] = RecordedHit(hit=hit, num_tokens=generated)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.states:
            return logits
        forced = [(row, state.spec.stop_token_id) for row, state in self.states.items() if state.forced]
        if forced:
            rows = torch.tensor([row for row, _ in forced], device=logits.device)
            stop_ids = torch.tensor([stop for _, stop in forced], device=logits.device)
            logits[rows] = float("-inf")
            logits[rows, stop_ids] = 0.0
        tracked = [(row, state) for row, state in self.states.items() if state.spec.track_confidence]
        if tracked:
            rows = torch.tensor([row for row, _ in tracked], device=logits.device)
            temperatures = torch.tensor(
                [state.spec.temperature for _, state in tracked], device=logits.device, dtype=torch.float32
            )
            scaled = logits[rows].float() / temperatures[:, None]
            top_values, top_ids = scaled.max(dim=-1)
            top_logprobs = top_values - torch.logsumexp(scaled, dim=-1)
            for (_, state), token, logprob in zip(tracked, top_ids.tolist(), top_logprobs.tolist(), strict=True):
                state.tops[len(state.output_token_ids)] = (token, logprob)  # the index this row's token will take
        return logits
