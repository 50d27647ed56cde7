"""Shared-prompt pi_old forward (models/prefix_sharing.py) against the full padded forward of the same model.

Reference: `MegatronPolicy.response_logprobs`, which runs every prompt + response as its own row. With equal prompt
lengths the positions are the same, so results agree to float noise (other matmul shapes). Ragged prompts are
left-padded, which moves RoPE to other absolute positions (same relative ones): agreement within float32 RoPE
rounding. Dense and MoE at TP=1, dense at TP=2; a sequence-parallel model must report that it cannot share (the
trainer then runs the full forward).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.models.distributed import run_workers

pytestmark = [pytest.mark.mcore]


def _groups(ragged: bool, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """4 groups of 4 responses (one empty when ragged), prompt lengths 9 or 5..12."""
    generator = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for group in range(4):
        length = 5 + 2 * group if ragged else 9
        prompt = torch.randint(3, 200, (length,), generator=generator).tolist()
        for member in range(4):
            size = 0 if ragged and group == 1 and member == 2 else int(torch.randint(1, 12, (1,), generator=generator))
            prompts.append(prompt)
            responses.append(torch.randint(3, 200, (size,), generator=generator).tolist())
    return prompts, responses


def _worker(hf_dir: str, tp: int, sequence_parallel: bool) -> dict[str, Any]:
    from megatron_dispo.models.microbatch import build_microbatch
    from megatron_dispo.models.optimizer import OptimizerSettings
    from megatron_dispo.models.parallel import ParallelConfig, initialize_parallel
    from megatron_dispo.models.policy import MegatronPolicy
    from megatron_dispo.models.prefix_sharing import shared_prefix_logits

    parallel = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel)
    initialize_parallel(parallel)
    policy = MegatronPolicy(hf_dir, parallel, OptimizerSettings(lr=1e-3, weight_decay=0.0), temperature=0.7)
    result: dict[str, Any] = {"supported": policy.supports_prompt_sharing}
    if not policy.supports_prompt_sharing:
        return result
    for ragged in (False, True):
        prompts, responses = _groups(ragged)
        indices = [i for i, r in enumerate(responses) if r]
        full = policy.response_logprobs(
            [build_microbatch(indices, prompts, responses, pad_token_id=0, pad_to_multiple_of=tp)]
        )
        # chunks that split a group: its prompt runs once per chunk
        chunks = [list(range(0, 6)), list(range(6, 16))]
        shared = policy.shared_prompt_logprobs(chunks, prompts, responses)
        result[ragged] = (full, shared, [len(r) for r in responses])
    with pytest.raises(ValueError, match="one prompt per response"):
        shared_prefix_logits(policy.model, [[1, 2]], [[3], [4]], pad_token_id=0)
    policy.model.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        shared_prefix_logits(policy.model, [[1, 2]], [[3]], pad_token_id=0)
    result["errors_checked"] = True
    return result


def _check(result: dict[str, Any]) -> None:
    assert result["supported"] and result["errors_checked"]
    for ragged, tolerance in ((False, 2e-5), (True, 1e-4)):
        full, shared, lengths = result[ragged]
        assert sorted(shared) == list(range(len(lengths)))
        for index, length in enumerate(lengths):
            assert len(shared[index]) == length
            if length:
                difference = (torch.tensor(shared[index]) - torch.tensor(full[index])).abs().max().item()
                assert difference <= tolerance, (ragged, index, difference)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model", ["dense", "moe"])
def test_shared_prompt_forward_equals_full_forward(model: str, tiny_checkpoints: dict[str, Path]) -> None:
    (result,) = run_workers(_worker, 1, timeout_s=240, args=(str(tiny_checkpoints[model]), 1, False))
    _check(result)


@pytest.mark.timeout(300)
def test_shared_prompt_forward_at_tp2_equals_full_forward(tiny_checkpoints: dict[str, Path]) -> None:
    results = run_workers(_worker, 2, timeout_s=240, args=(str(tiny_checkpoints["dense"]), 2, False))
    for result in results:
        _check(result)
    for ragged in (False, True):  # every TP rank ends with the same values
        first, second = results[0][ragged][1], results[1][ragged][1]
        assert sorted(first) == sorted(second)
        assert all(torch.equal(first[index], second[index]) for index in first)


@pytest.mark.timeout(300)
def test_sequence_parallel_model_reports_no_prompt_sharing(tiny_checkpoints: dict[str, Path]) -> None:
    results = run_workers(_worker, 2, timeout_s=240, args=(str(tiny_checkpoints["dense"]), 2, True))
    assert [result["supported"] for result in results] == [False, False]
