"""MegatronPolicy through Megatron's pipeline schedules: PP=2 and TP=2 + sequence parallel against PP=1.

One worker runs what the trainer runs, on micro-batches of different shapes (the pipeline exchanges each
activation's shape; sequence parallelism needs the policy to pad odd lengths to a multiple of TP): pi_old log-probs
(forward-only schedule), an on-policy update that captures pi_old, an off-policy update, log-probs after both, and
the weight export to rank 0 and to all ranks. Every rank must return the same values (results are broadcast from the
last stage), and the layouts must agree with PP=1: log-probs to float noise, loss to 1e-5, grad norm to 1e-3
relative, exported tensors exactly (same names, each once).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.models.distributed import run_workers

pytestmark = [pytest.mark.mcore]

PROMPT_LENGTHS = (5, 7, 4, 6, 3)
RESPONSE_LENGTHS = (6, 3, 8, 5, 4)  # sequence lengths 11, 10, 12, 11, 7: odd widths once padded per micro-batch
SPLITS = ((0, 1), (2, 3, 4))


def _worker(hf_dir: str, layout: dict[str, Any]) -> dict[str, Any]:
    from megatron_dispo.algorithms import get_preset
    from megatron_dispo.models.convert import export_hf_weights
    from megatron_dispo.models.microbatch import build_microbatch
    from megatron_dispo.models.optimizer import OptimizerSettings
    from megatron_dispo.models.parallel import ParallelConfig, initialize_parallel
    from megatron_dispo.models.policy import MegatronPolicy
    from megatron_dispo.trainer.batching import response_token_count

    parallel = ParallelConfig(**layout)
    initialize_parallel(parallel)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]
    responses = [torch.randint(3, 200, (n,), generator=generator).tolist() for n in RESPONSE_LENGTHS]
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.25])
    correct = torch.tensor([True, False, True, False, True])  # by sequence
    loss_config = get_preset("dispo")
    num_tokens = response_token_count(range(len(prompts)), responses)

    def micro(old: dict[int, list[float]] | None) -> list[Any]:
        return [
            build_microbatch(
                ix, prompts, responses, pad_token_id=0, old_logprobs=old, advantages=advantages, correct=correct
            )
            for ix in SPLITS
        ]

    policy = MegatronPolicy(hf_dir, parallel, OptimizerSettings(lr=1e-3, weight_decay=0.0))
    rank = torch.distributed.get_rank()
    to_rank0 = [(name, tensor.clone()) for name, tensor in policy.export_weights("rank0")]
    to_all = [(name, tensor.clone()) for name, tensor in export_hf_weights(policy.model, policy.hf_config)]
    old = policy.response_logprobs(micro(None))
    update = {"num_global_tokens": num_tokens, "num_global_sequences": len(prompts)}
    captured_update = policy.train_minibatch(micro(None), loss_config, old_logprobs="capture", **update)
    on_policy, captured = captured_update.metrics, captured_update.captured_old_logprobs
    off_policy = policy.train_minibatch(micro(old), loss_config, **update).metrics
    after = policy.response_logprobs(micro(None))
    return {
        "rank": rank,
        "prompt_sharing": policy.supports_prompt_sharing,
        "old": old,
        "captured": captured,
        "on_policy": on_policy,
        "off_policy": off_policy,
        "after": after,
        "to_rank0": to_rank0,
        "to_all": to_all,
    }


@pytest.fixture(scope="module")
def baseline(tiny_checkpoints: dict[str, Path]) -> dict[str, Any]:
    (result,) = run_workers(_worker, 1, timeout_s=200, args=(str(tiny_checkpoints["dense"]), {}))
    return result


def _close_logprobs(got: dict[int, list[float]], want: dict[int, list[float]], atol: float) -> None:
    assert sorted(got) == sorted(want) == list(range(len(PROMPT_LENGTHS)))
    for index, values in want.items():
        assert len(got[index]) == len(values) == RESPONSE_LENGTHS[index]
        assert torch.allclose(torch.tensor(got[index]), torch.tensor(values), atol=atol, rtol=0), index


def _check_against(results: list[dict[str, Any]], baseline: dict[str, Any]) -> None:
    for result in results:  # every rank returns the last stage's values
        _close_logprobs(result["old"], baseline["old"], 2e-5)
        _close_logprobs(result["captured"], baseline["captured"], 2e-5)
        _close_logprobs(result["after"], baseline["after"], 2e-4)
        for step in ("on_policy", "off_policy"):
            got, want = result[step], baseline[step]
            assert set(got) == set(want)
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-7), step
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-3), step
            assert got["entropy"] == pytest.approx(want["entropy"], rel=1e-5), step
        assert result["off_policy"]["regime1/token_frac"] == results[0]["off_policy"]["regime1/token_frac"]
    # the first update is on-policy (r = 1 exactly); it moved the model, so the second sees r != 1 and log-probs changed
    assert baseline["on_policy"]["log_ratio_abs_mean"] == 0.0
    assert baseline["off_policy"]["log_ratio_abs_mean"] > 1e-3
    moved = [abs(a - b) for i in baseline["old"] for a, b in zip(baseline["old"][i], baseline["after"][i], strict=True)]
    assert max(moved) > 1e-3
    want = baseline["to_rank0"]
    names = [name for name, _ in want]
    assert len(names) == len(set(names))
    for result in results:
        got = result["to_rank0"]
        if result["rank"] != 0:
            assert got == []  # only rank 0 receives
            continue
        assert [name for name, _ in got] == names  # same tensors, each once, in the same (layer) order
        for (name, tensor), (_, reference) in zip(got, want, strict=True):
            assert torch.equal(tensor, reference), name
        assert [name for name, _ in result["to_all"]] == names
    for result in results:
        for (name, tensor), (_, reference) in zip(result["to_all"], baseline["to_all"], strict=True):
            assert torch.equal(tensor, reference), name


@pytest.mark.timeout(300)
def test_pipeline_parallel_matches_pp1(tiny_checkpoints: dict[str, Path], baseline: dict[str, Any]) -> None:
    results = run_workers(
        _worker, 2, timeout_s=240, args=(str(tiny_checkpoints["dense"]), {"pipeline_model_parallel_size": 2})
    )
    _check_against(results, baseline)
    assert baseline["prompt_sharing"] and not any(r["prompt_sharing"] for r in results)  # PP: full forward for pi_old


@pytest.mark.timeout(300)
def test_sequence_parallel_pads_inside_the_policy(tiny_checkpoints: dict[str, Path], baseline: dict[str, Any]) -> None:
    layout = {"tensor_model_parallel_size": 2, "sequence_parallel": True}
    results = run_workers(_worker, 2, timeout_s=240, args=(str(tiny_checkpoints["dense"]), layout))
    _check_against(results, baseline)
