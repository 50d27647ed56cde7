"""Repetition early truncation inside vLLM's V2 model runner (the GPU engine's runner, pinned by the engine).

vLLM 0.32+ runs Model Runner V2 by default wherever Triton exists, and its processor loader
(``v1/worker/gpu/sample/logits_processor/loader.py``) accepts only subclasses of the V2 ``LogitsProcessor``: a
per-slot ``add_request`` and one ``apply(logits, ctx)`` per step. There is no per-step token list: committed tokens
live on the device (``req_states.all_token_ids``). So the processor keeps every step on the device and reads the
host only when a check is due (every ``check_every`` tokens), once for all due requests:

* per step, for requests tracking confidence, each row's top token and its log-prob under the request's temperature
  are written on the device at the position of the token being sampled (``ctx.pos + 1``);
* when a request's generated count (host-side: ``seq_lens_upper_bound_np - prompt_len``, exact without speculative
  decoding) reaches its next check, its tokens and recorded tops are copied to the host together and
  :func:`detect_repetition` runs there; on a hit it is recorded (same hand-back as the V1 processor) and the stop
  token is forced at this very step through a device mask. Slots are recycled, so a hit also holds ``stop_ids``
  until the slot's next ``add_request``.

Same semantics as :mod:`.repetition_stop` (V1, the CPU engine): stop at most ``check_every + 1`` tokens after the
evidence is complete, the forced token dropped by the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcessor, LogitsProcRequestState

from megatron_dispo.algorithms.repetition import detect_repetition
from megatron_dispo.rollout.repetition_request import (
    RecordedHit,
    RequestSpec,
    request_spec,
    token_logprob,
    validate_spec,
)

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig


@dataclass
class _SlotState:
    spec: RequestSpec
    checked_len: int = 0
    first_recorded: int | None = None
    """Sequence position from which this slot holds recorded tops (a resumed request's earlier tokens have none)."""
    forced: bool = False


@dataclass(frozen=True)
class _DueCheck:
    slot: int
    state: _SlotState
    prompt_len: int
    generated: int


class RepetitionStopProcessorV2(LogitsProcessor):
    """vLLM V2 logits processor implementing repetition early truncation (see the module docstring)."""

    hits: ClassVar[dict[str, RecordedHit] | None] = None
    """uid -> hit, filled by the processor, drained by the engine after each ``generate``; set by ``reporting_to``."""

    @classmethod
    def reporting_to(cls, hits: dict[str, RecordedHit]) -> type[RepetitionStopProcessorV2]:
        """A subclass whose instances record hits into ``hits`` (one per engine: the engine owns the dict)."""
        return type(cls.__name__, (cls,), {"hits": hits, "__module__": cls.__module__})

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        validate_spec(sampling_params)

    def __init__(self, vllm_config: VllmConfig | None, req_states: LogitsProcRequestState) -> None:
        if self.hits is None:
            raise TypeError("give vLLM RepetitionStopProcessorV2.reporting_to(hits), not the base class.")
        self._hits: dict[str, RecordedHit] = self.hits
        self.req_states = req_states
        device, slots = req_states.device, req_states.max_num_reqs
        self.states: dict[int, _SlotState] = {}
        self.stop_ids = torch.full((slots,), -1, dtype=torch.int64, device=device)
        """Forced stop token per slot (-1: none), gathered per row on the device."""
        self.temperature = torch.ones(slots, dtype=torch.float32, device=device)
        self._tops: tuple[torch.Tensor, torch.Tensor] | None = None  # [slots, max_model_len + 1] ids, log-probs
        self.host_reads = 0
        """Device-to-host copies made so far (one per step with a due check): a test and a log read it."""

    def _top_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tops is None:  # only engines with confident_run requests pay for it
            slots, width = self.req_states.all_token_ids.gpu.shape
            device = self.req_states.device
            self._tops = (
                torch.zeros(slots, width + 1, dtype=torch.int32, device=device),
                torch.full((slots, width + 1), float("-inf"), dtype=torch.float32, device=device),
            )
        return self._tops

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        """(Re)initialise the slot: a recycled slot must not keep its previous occupant's stop or state."""
        spec = request_spec(sampling_params)
        self.stop_ids[req_idx] = -1
        if spec is None:
            self.states.pop(req_idx, None)
            return False
        self.states[req_idx] = _SlotState(spec)
        self.temperature[req_idx] = spec.temperature
        return True

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        present = [
            (position, int(slot), state)
            for position, slot in enumerate(ctx.idx_mapping_np)
            if (state := self.states.get(int(slot))) is not None
        ]
        if not present:
            return logits
        prompt_len = self.req_states.prompt_len.np
        due: list[_DueCheck] = []
        for position, slot, state in present:
            seq_len = int(ctx.seq_lens_upper_bound_np[position])
            if state.first_recorded is None:
                state.first_recorded = seq_len  # the first token whose top this slot records
            generated = seq_len - int(prompt_len[slot])
            if not state.forced and generated > 0 and generated - state.checked_len >= state.spec.config.check_every:
                due.append(_DueCheck(slot, state, int(prompt_len[slot]), generated))
        if any(state.spec.track_confidence for _, _, state in present):
            self._record_tops(logits, ctx)
        if due:
            self._check(due)
        if any(state.forced for _, _, state in present):
            self._force_stop(logits, ctx)
        return logits

    def _record_tops(self, logits: torch.Tensor, ctx: LogitsContext) -> None:
        """Each row's top token and log-prob under its temperature, at the position it samples: device only."""
        top_ids, top_logprobs = self._top_buffers()
        slots = ctx.expanded_idx_mapping.long()
        scaled = logits.float() / self.temperature[slots][:, None]
        values, ids = scaled.max(dim=-1)
        columns = (ctx.pos.long() + 1).clamp_(max=top_ids.shape[1] - 1)
        top_ids[slots, columns] = ids.to(top_ids.dtype)
        top_logprobs[slots, columns] = values - torch.logsumexp(scaled, dim=-1)

    def _check(self, due: list[_DueCheck]) -> None:
        """Run the detector on every due request; one device-to-host copy for all of them."""
        tokens = self.req_states.all_token_ids.gpu
        chunks: list[torch.Tensor] = []
        for check in due:
            span = slice(check.prompt_len, check.prompt_len + check.generated)
            chunks.append(tokens[check.slot, span].to(torch.int64))
            if check.state.spec.track_confidence:
                top_ids, top_logprobs = self._top_buffers()
                chunks += [top_ids[check.slot, span].to(torch.int64), top_logprobs[check.slot, span].double()]
        host = [chunk.tolist() for chunk in torch.cat([c.double() for c in chunks]).cpu().split(_sizes(chunks))]
        self.host_reads += 1
        for check in due:
            ids = [int(token) for token in host.pop(0)]
            logprobs = None
            if check.state.spec.track_confidence:
                top_ids, top_lps = host.pop(0), host.pop(0)
                recorded_from = (check.state.first_recorded or 0) - check.prompt_len
                logprobs = [
                    token_logprob(token, int(top), lp) if index >= recorded_from else float("-inf")
                    for index, (token, top, lp) in enumerate(zip(ids, top_ids, top_lps, strict=True))
                ]
            check.state.checked_len = check.generated
            hit = detect_repetition(ids, check.state.spec.config, logprobs)
            if hit is not None:
                check.state.forced = True
                self.stop_ids[check.slot] = check.state.spec.stop_token_id
                self._hits[check.state.spec.uid] = RecordedHit(hit=hit, num_tokens=check.generated)

    def _force_stop(self, logits: torch.Tensor, ctx: LogitsContext) -> None:
        """Rows of forced slots: every logit -inf but the stop token's (0), by a device mask (no host read)."""
        stop = self.stop_ids[ctx.expanded_idx_mapping.long()]
        vocab = torch.arange(logits.shape[-1], device=logits.device)
        is_stop = vocab[None, :] == stop[:, None]
        forced_rows = (stop >= 0)[:, None]
        logits.masked_fill_(forced_rows & ~is_stop, float("-inf"))
        logits.masked_fill_(forced_rows & is_stop, 0.0)


def _sizes(chunks: list[Any]) -> list[int]:
    return [int(chunk.numel()) for chunk in chunks]
