"""What the replicated engine moves to the driver (issue 24, finding 7, replica side): two TP-2 replicas in a 4-rank
gloo world (no vLLM: an engine that echoes deterministic responses and routing, ``replica_bytes_worker.py``).

Only replica leaders send results, and routing travels as 1-byte expert codes (128 experts, as Qwen3-30B-A3B); the
driver still gets every response's routing back exactly, ``NO_ROUTE`` included.
"""

from __future__ import annotations

import torch

from megatron_dispo.rollout.placement import deal_groups
from tests.models.distributed import run_workers
from tests.rollout.replica_bytes_worker import (
    LAYERS,
    PROMPTS,
    TOP_K,
    expected_response,
    expected_routing,
    routing_bytes_worker,
)

NUM_GPUS = 0
N = 2


def test_gpu_contract_only_replica_leaders_send_routing_as_byte_codes() -> None:
    num_experts, code_bytes = 128, 1  # 2-byte codes (>= 256 experts): tests/trainer/test_routing_wiring.py
    results = run_workers(routing_bytes_worker, 4, timeout_s=120, args=(num_experts,))
    driver = results[0]
    for index in range(len(PROMPTS)):
        for sample in range(N):
            slot = index * N + sample
            assert driver["response_ids"][slot] == expected_response(index, sample)
            assert torch.equal(driver["routed"][slot], expected_routing(index, sample, num_experts))
    assert [results[1]["sent"], results[3]["sent"]] == [0, 0], "TP followers must send nothing"
    # replica 1's leader (rank 2): its share's lengths, finish codes and ids as int64, log-probs as float32, and the
    # routing: an 8-byte header, then one code per (row, layer, k), rows = prompt + response - 1
    share = deal_groups([N * (len(prompt) + 8) for prompt in PROMPTS], 2)[1]
    responses = [len(expected_response(p, s)) for p in share for s in range(N)]
    rows = sum(len(PROMPTS[p]) + len(expected_response(p, s)) - 1 for p in share for s in range(N))
    ints = 8 * (2 * len(responses) + sum(responses))
    assert results[2]["sent"] == ints + 4 * sum(responses) + 8 + rows * LAYERS * TOP_K * code_bytes
