"""What a request asks of repetition truncation, shared by both vLLM logits-processor interfaces.

vLLM has two model runners with two processor interfaces: V1 (``vllm.v1.sample.logits_processor``, the CPU engine)
and V2 (``vllm.v1.worker.gpu.sample.logits_processor``, the default GPU runner from vLLM 0.32 on, which refuses V1
processors at load time). :mod:`.repetition_stop` implements the first, :mod:`.repetition_stop_v2` the second; both
read the request's opt-in from here, cut its tokens to the committed ones, and bound a non-top token's log-prob the
same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from megatron_dispo.algorithms.repetition import RepetitionConfig, RepetitionHit

if TYPE_CHECKING:
    from vllm import SamplingParams

__all__ = [
    "EXTRA_ARGS_KEY",
    "RecordedHit",
    "RequestSpec",
    "committed_tokens",
    "repetition_extra_args",
    "request_spec",
    "token_logprob",
    "validate_spec",
]

EXTRA_ARGS_KEY = "megatron_dispo_repetition"
"""Key in ``SamplingParams.extra_args`` that opts a request into repetition truncation."""

PLACEHOLDER = -1
"""Token id vLLM's V1 runner appends to ``output_token_ids`` under async scheduling until the sampled id is known."""


@dataclass(frozen=True)
class RecordedHit:
    """A detector hit and the number of generated tokens it was found in (the response is cut to that length)."""

    hit: RepetitionHit
    num_tokens: int


@dataclass(frozen=True)
class RequestSpec:
    """One opted-in request: its uid, detector thresholds, stop token and sampling temperature."""

    uid: str
    config: RepetitionConfig
    stop_token_id: int
    temperature: float
    """The request's temperature (1.0 for greedy): confidences are probabilities under the sampling distribution."""

    @property
    def track_confidence(self) -> bool:
        return self.config.confident_run > 0


def repetition_extra_args(uid: str, config: RepetitionConfig, stop_token_id: int) -> dict[str, Any]:
    """The ``extra_args`` entry that opts one request in (plain types only: vLLM may serialise extra_args)."""
    return {EXTRA_ARGS_KEY: {"uid": uid, "config": asdict(config), "stop_token_id": int(stop_token_id)}}


def validate_spec(params: SamplingParams) -> None:
    """Raise ``ValueError`` at admission for an ``extra_args`` entry not built by :func:`repetition_extra_args`."""
    spec = (params.extra_args or {}).get(EXTRA_ARGS_KEY)
    if spec is None:
        return
    if not isinstance(spec, dict) or not {"uid", "config", "stop_token_id"} <= spec.keys():
        raise ValueError(
            f"extra_args[{EXTRA_ARGS_KEY!r}] must be built by repetition_extra_args(uid, config, stop_token_id)."
        )


def request_spec(params: SamplingParams) -> RequestSpec | None:
    """The request's opt-in, or None when it did not opt in (or switched the detector off)."""
    spec = (params.extra_args or {}).get(EXTRA_ARGS_KEY)
    if spec is None:
        return None
    config = RepetitionConfig(**spec["config"])
    if not config.enabled:
        return None
    temperature = float(params.temperature) if params.temperature > 1e-5 else 1.0
    return RequestSpec(spec["uid"], config, int(spec["stop_token_id"]), temperature)


def committed_tokens(output_token_ids: Sequence[int]) -> Sequence[int]:
    """The tokens before the first async-scheduling placeholder (``-1``): the ones whose ids are known."""
    for index, token in enumerate(output_token_ids):
        if token == PLACEHOLDER:
            return output_token_ids[:index]
    return output_token_ids


def token_logprob(token: int, top_token: int, top_logprob: float) -> float:
    """Log-prob of ``token`` given the row's top token and its log-prob: exact for the top token; otherwise
    ``p <= 1 - p_top``, which is below any ``confident_prob >= 0.5``, so the confident-run rule's verdict is exact."""
    if token == top_token:
        return top_logprob
    return min(top_logprob, math.log1p(-min(math.exp(top_logprob), 1.0 - 1e-12)))
