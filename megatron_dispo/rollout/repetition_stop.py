"""Repetition early truncation inside vLLM: a v1 logits processor that forces a stop token on looping sequences.

Every ``check_every`` generated tokens the processor runs :func:`detect_repetition` on each opted-in request's
output so far. On a hit it records the hit (for the engine to read back) and, at the next decoding step, masks every
logit but the request's stop token, so the request ends at once. The engine then drops that forced token and reports
``finish_reason="repetition"``. A looping sequence is therefore stopped at most ``check_every + 1`` tokens after the
detector's evidence is complete.

Confidence (for the detector's ``confident_run`` rule) is tracked without copying the logits: at each step the
processor keeps each row's top token and its log-prob under the request's temperature; when the next token arrives,
its log-prob is exact if it was the top token, and otherwise at most ``log(1 - p_top)`` -- below any
``confident_prob >= 0.5``, so the rule's verdict is exact. top-p is not taken into account (it only sharpens).

Requests opt in through ``SamplingParams.extra_args[EXTRA_ARGS_KEY]`` (uid, detector config, stop token), so one
engine can mix truncated and untruncated requests. Hits are handed back, keyed by uid, through the dict of the engine
that owns the processor (:meth:`RepetitionStopProcessor.reporting_to`): this needs the engine core in the caller's
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), which is how the rollout engine always runs vLLM.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from megatron_dispo.algorithms.repetition import RepetitionConfig, RepetitionHit, detect_repetition

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig

EXTRA_ARGS_KEY = "megatron_dispo_repetition"
"""Key in ``SamplingParams.extra_args`` that opts a request into repetition truncation."""


@dataclass(frozen=True)
class RecordedHit:
    """A detector hit and the number of generated tokens it was found in (the response is cut to that length)."""

    hit: RepetitionHit
    num_tokens: int


def repetition_extra_args(uid: str, config: RepetitionConfig, stop_token_id: int) -> dict[str, Any]:
    """The ``extra_args`` entry that opts one request in (plain types only: vLLM may serialise extra_args)."""
    return {EXTRA_ARGS_KEY: {"uid": uid, "config": asdict(config), "stop_token_id": int(stop_token_id)}}


@dataclass
class _RequestState:
    uid: str
    config: RepetitionConfig
    stop_token_id: int
    temperature: float
    output_token_ids: list[int]  # live reference to vLLM's list of generated tokens
    track_confidence: bool
    token_logprobs: list[float] = field(default_factory=list)
    checked_len: int = 0
    forced: bool = False


class RepetitionStopProcessor(LogitsProcessor):
    """vLLM v1 logits processor implementing repetition early truncation (see the module docstring).

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
        spec = (sampling_params.extra_args or {}).get(EXTRA_ARGS_KEY)
        if spec is None:
            return
        if not isinstance(spec, dict) or not {"uid", "config", "stop_token_id"} <= spec.keys():
            raise ValueError(
                f"extra_args[{EXTRA_ARGS_KEY!r}] must be built by repetition_extra_args(uid, config, stop_token_id)."
            )

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        if self.hits is None:
            raise TypeError("give vLLM RepetitionStopProcessor.reporting_to(hits), not the base class.")
        self._hits: dict[str, RecordedHit] = self.hits
        self.device = device
        self.states: dict[int, _RequestState] = {}
        # row -> (top token id, its log-prob) from the latest apply(); consumed by the next update_state()
        self.last_top: dict[int, tuple[int, float]] = {}

    def is_argmax_invariant(self) -> bool:
        """Forcing the stop token changes greedy decoding too."""
        return False

    @staticmethod
    def _new_state(params: SamplingParams, output_token_ids: list[int]) -> _RequestState | None:
        spec = (params.extra_args or {}).get(EXTRA_ARGS_KEY)
        if spec is None:
            return None
        config = RepetitionConfig(**spec["config"])
        if not config.enabled:
            return None
        return _RequestState(
            uid=spec["uid"],
            config=config,
            stop_token_id=int(spec["stop_token_id"]),
            temperature=float(params.temperature) if params.temperature > 1e-5 else 1.0,
            output_token_ids=output_token_ids,
            track_confidence=config.confident_run > 0,
        )

    def _record_new_token_logprobs(self) -> None:
        """Append the log-prob of each request's newest token(s), using the rows as they were at the last apply()."""
        for row, state in self.states.items():
            if not state.track_confidence:
                continue
            new_tokens = state.output_token_ids[len(state.token_logprobs) :]
            for position, token in enumerate(new_tokens):
                top = self.last_top.get(row) if position == len(new_tokens) - 1 else None
                if top is None:
                    state.token_logprobs.append(float("-inf"))  # no logits seen for it: never "confident"
                elif token == top[0]:
                    state.token_logprobs.append(top[1])
                else:  # not the top token: p <= 1 - p_top
                    state.token_logprobs.append(min(top[1], math.log1p(-min(math.exp(top[1]), 1.0 - 1e-12))))
        self.last_top = {}

    def _apply_batch_update(self, batch_update: BatchUpdate) -> None:
        for index in batch_update.removed:
            self.states.pop(index, None)
        for index, params, _prompt_ids, output_token_ids in batch_update.added:
            state = self._new_state(params, output_token_ids)
            if state is None:
                self.states.pop(index, None)
            else:
                self.states[index] = state
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
            generated = len(state.output_token_ids)
            if state.forced or generated - state.checked_len < state.config.check_every:
                continue
            state.checked_len = generated
            logprobs = state.token_logprobs[:generated] if state.track_confidence else None
            hit = detect_repetition(state.output_token_ids, state.config, logprobs)
            if hit is not None:
                state.forced = True
                self._hits[state.uid] = RecordedHit(hit=hit, num_tokens=generated)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.states:
            return logits
        forced = [(row, state.stop_token_id) for row, state in self.states.items() if state.forced]
        if forced:
            rows = torch.tensor([row for row, _ in forced], device=logits.device)
            stop_ids = torch.tensor([stop for _, stop in forced], device=logits.device)
            logits[rows] = float("-inf")
            logits[rows, stop_ids] = 0.0
        tracked = [(row, state.temperature) for row, state in self.states.items() if state.track_confidence]
        if tracked:
            rows = torch.tensor([row for row, _ in tracked], device=logits.device)
            temperatures = torch.tensor([temp for _, temp in tracked], device=logits.device, dtype=torch.float32)
            scaled = logits[rows].float() / temperatures[:, None]
            top_values, top_ids = scaled.max(dim=-1)
            top_logprobs = top_values - torch.logsumexp(scaled, dim=-1)
            for (row, _), token, logprob in zip(tracked, top_ids.tolist(), top_logprobs.tolist(), strict=True):
                self.last_top[row] = (token, logprob)
        return logits
