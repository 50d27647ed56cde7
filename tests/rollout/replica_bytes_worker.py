"""Worker of test_replica_routing_bytes.py: a 4-rank gloo world of two TP-2 replicas around a deterministic engine.

Every rank holds the same echo engine (what TP ranks of one vLLM replica return is identical), so the test measures
only what the replicated engine moves: bytes each rank sends in the results phase.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_dispo.rollout.batch import RolloutBatch
from megatron_dispo.rollout.config import RolloutConfig
from megatron_dispo.rollout.placement import place_replicas
from megatron_dispo.rollout.replicas import ReplicatedEngine

LAYERS, TOP_K = 3, 2
PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]


def expected_response(prompt_index: int, sample: int) -> list[int]:
    return [prompt_index * 10 + sample + 1] * (prompt_index + 2)


def expected_routing(prompt_index: int, sample: int, num_experts: int) -> torch.Tensor:
    rows = len(PROMPTS[prompt_index]) + prompt_index + 1  # prompt + response - 1 (the last token routes nothing)
    values = torch.arange(rows * LAYERS * TOP_K).reshape(rows, LAYERS, TOP_K) * 7 + prompt_index * 31 + sample
    routed = (values % num_experts).to(torch.int16)
    routed[0] = -1  # a row the engine did not report (NO_ROUTE)
    return routed


class _Tokenizer:
    def batch_decode(self, ids: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        return [" ".join(map(str, row)) for row in ids]


class _EchoEngine:
    """Answers ``generate`` with responses and routing that depend only on (prompt index, sample)."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts, self.call_index, self._call_index, self.tokenizer = num_experts, 0, 0, _Tokenizer()

    def generate(self, prompts: list[list[int]], n: int, *, prompt_indices: list[int], **_: Any) -> RolloutBatch:
        pairs = [(p, s) for p in prompt_indices for s in range(n)]
        responses = [expected_response(p, s) for p, s in pairs]
        return RolloutBatch(
            prompt_ids=prompts,
            response_ids=responses,
            response_logprobs=[[-0.5] * len(r) for r in responses],
            finish_reason=["stop"] * len(pairs),
            group_index=[i for i in range(len(prompts)) for _ in range(n)],
            group_size=n,
            texts=[""] * len(pairs),
            stats={
                "rollout/seconds": 0.01,
                "rollout/repetition/ngram": 0.0,
                "rollout/repetition/confident_run": 0.0,
                "rollout/repetition/forced_tokens_dropped": 0.0,
            },
            routed_experts=[expected_routing(p, s, self.num_experts) for p, s in pairs],
        )


def routing_bytes_worker(num_experts: int) -> dict[str, Any]:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    engine = ReplicatedEngine.__new__(ReplicatedEngine)
    engine.config = RolloutConfig(tensor_parallel_size=2, capture_routed_experts=True, max_new_tokens=8)
    engine.model_path = Path(".")
    engine.placement = place_replicas(rank, 4, 2, 4)
    engine._broken, engine._bound = None, "the test's bound"
    engine._group = dist.new_group(backend="gloo")
    engine._local_engine = _EchoEngine(num_experts)
    sent = [0]
    send, gather = dist.send, dist.gather

    def counting_send(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        sent[0] += tensor.numel() * tensor.element_size()
        return send(tensor, *args, **kwargs)

    def counting_gather(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        sent[0] += tensor.numel() * tensor.element_size() if rank != 0 else 0  # the driver keeps its own
        return gather(tensor, *args, **kwargs)

    dist.send, dist.gather = counting_send, counting_gather
    try:
        batch = engine._run_generate(PROMPTS, 2, 0, {}, time.perf_counter())
    finally:
        dist.send, dist.gather = send, gather
    out: dict[str, Any] = {"sent": sent[0]}
    if batch is not None:
        out["response_ids"] = batch.response_ids
        out["routed"] = batch.routed_experts
    return out
