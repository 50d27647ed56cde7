"""Both repetition processors without a vLLM engine: V1 (CPU runner) under async-scheduling placeholders, and V2
(the GPU runner's interface) driven step by step on CPU tensors laid out as vLLM's V2 runner lays them out.

The V2 simulation: slot 1 opted in, slot 3 not; each step the "model" puts all mass on the next token of a period-8
cycle; the sampled token is committed to ``all_token_ids`` as vLLM's ``post_update`` does. Expected values are
counted by hand from the detector's thresholds.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from megatron_dispo.algorithms.repetition import RepetitionConfig
from megatron_dispo.rollout.repetition_stop import RepetitionStopProcessor, repetition_extra_args

pytestmark = pytest.mark.vllm
NUM_GPUS = 0
CYCLE = [11, 12, 13, 14, 15, 16, 17, 18]
STOP, VOCAB, WIDTH = 2, 32, 160


def _params(uid: str, detector: RepetitionConfig, temperature: float = 0.0) -> Any:
    from vllm import SamplingParams

    return SamplingParams(temperature=temperature, extra_args=repetition_extra_args(uid, detector, STOP))


def test_gpu_contract_v1_repetition_ignores_async_placeholders() -> None:
    """vLLM's V1 runner appends -1 for tokens it has not sampled yet (async scheduling): the detector sees the 32
    known tokens (4 periods of 8) and cuts there, not at 33 with a -1 in the tail."""
    from vllm.v1.sample.logits_processor import BatchUpdate

    hits: dict[str, Any] = {}
    processor = RepetitionStopProcessor.reporting_to(hits)(None, torch.device("cpu"), False)
    detector = RepetitionConfig(min_repeats=4, min_repeat_tokens=32, check_every=8, confident_run=0)
    output = CYCLE * 4 + [-1]
    processor.update_state(
        BatchUpdate(batch_size=1, removed=[], added=[(0, _params("u", detector), [1], output)], moved=[])
    )
    assert hits["u"].num_tokens == 32 and hits["u"].hit.kind == "ngram"


def _v2_run(detector: RepetitionConfig, temperature: float, steps: int) -> tuple[dict[str, Any], list[int], Any]:
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState

    from megatron_dispo.rollout.repetition_stop_v2 import RepetitionStopProcessorV2

    tokens = torch.zeros(4, WIDTH, dtype=torch.int32)
    prompt_len = np.zeros(4, dtype=np.int32)
    state = LogitsProcRequestState(
        device=torch.device("cpu"),
        max_num_reqs=4,
        vocab_size=VOCAB,
        all_token_ids=SimpleNamespace(gpu=tokens),
        prompt_len=SimpleNamespace(np=prompt_len),
        prefill_len=SimpleNamespace(np=prompt_len),
        total_len=SimpleNamespace(gpu=torch.zeros(4, dtype=torch.int32)),
    )
    hits: dict[str, Any] = {}
    processor = RepetitionStopProcessorV2.reporting_to(hits)(None, state)
    slots, lengths = [1, 3], {1: 3, 3: 3}
    for slot in slots:
        prompt_len[slot] = 3
        tokens[slot, :3] = torch.tensor([5, 6, 7])
    assert processor.add_request(1, _params("looping", detector, temperature))
    assert not processor.add_request(3, _params("plain", RepetitionConfig(enabled=False), temperature))
    generated: dict[int, list[int]] = {1: [], 3: []}
    for _ in range(steps):
        live = [slot for slot in slots if STOP not in generated[slot]]
        if not live:
            break
        logits = torch.full((len(live), VOCAB), -20.0)
        for row, slot in enumerate(live):
            logits[row, CYCLE[len(generated[slot]) % len(CYCLE)]] = 10.0
        mapping = torch.tensor(live, dtype=torch.int32)
        ctx = LogitsContext(
            expanded_idx_mapping=mapping,
            idx_mapping=mapping,
            idx_mapping_np=np.array(live, dtype=np.int32),
            expanded_local_pos=torch.zeros(len(live), dtype=torch.int32),
            input_ids=torch.zeros(len(live), dtype=torch.int32),
            pos=torch.tensor([lengths[slot] - 1 for slot in live]),
            seq_lens_upper_bound_np=np.array([lengths[slot] for slot in live], dtype=np.int32),
        )
        sampled = processor.apply(logits, ctx).argmax(dim=-1).tolist()
        for slot, token in zip(live, sampled, strict=True):  # vLLM's post_update commits the sampled token
            tokens[slot, lengths[slot]] = token
            lengths[slot] += 1
            generated[slot].append(token)
    return hits, [len(generated[1]), len(generated[3])], processor


def test_gpu_contract_v2_repetition_stops_the_loop_and_reads_the_host_once_per_check() -> None:
    """n-gram rule: 4 periods (32 tokens) are complete at the check after token 32, so the 33rd token is the forced
    stop; the untouched request runs on. Checks at 8, 16, 24, 32 tokens: 4 host reads in 33 steps, none in between."""
    detector = RepetitionConfig(min_repeats=4, min_repeat_tokens=32, check_every=8, confident_run=0)
    hits, lengths, processor = _v2_run(detector, temperature=0.0, steps=48)
    assert hits["looping"].num_tokens == 32 and hits["looping"].hit.kind == "ngram"
    assert lengths == [33, 48] and "plain" not in hits
    assert processor.host_reads == 4


def test_gpu_contract_v2_repetition_confident_run_uses_device_recorded_tops() -> None:
    """confident-run rule (p(top) ~ 1 at temperature 1): a run of 24 confident tokens is found at the check after 24
    tokens; the n-gram rule is out of reach."""
    detector = RepetitionConfig(min_repeat_tokens=10_000, confident_prob=0.9, confident_run=24, check_every=4)
    hits, lengths, _ = _v2_run(detector, temperature=1.0, steps=60)
    assert hits["looping"].hit.kind == "confident_run" and hits["looping"].num_tokens == 24
    assert lengths[0] == 25
