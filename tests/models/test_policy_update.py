"""MegatronPolicy's on-policy first update: training a micro-batch without pi_old uses its own detached log-probs.

Reference: the same update with pi_old from the separate no-grad forward (`response_logprobs`) on a fresh copy of
the same checkpoint. Both must give the same loss, gradient norm and new weights; the captured log-probs must equal
the separate forward's; and r = 1 exactly puts every token in no regime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.models.distributed import run_workers

pytestmark = [pytest.mark.mcore]


def _on_policy_worker(hf_dir: str) -> dict[str, Any]:
    from megatron_dispo.algorithms import get_preset
    from megatron_dispo.models.microbatch import build_microbatch
    from megatron_dispo.models.optimizer import OptimizerSettings
    from megatron_dispo.models.parallel import ParallelConfig, initialize_parallel
    from megatron_dispo.models.policy import MegatronPolicy
    from megatron_dispo.trainer.batching import response_token_count

    initialize_parallel(ParallelConfig())
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (int(n),), generator=generator).tolist() for n in (5, 7, 4, 6)]
    responses = [torch.randint(3, 200, (int(n),), generator=generator).tolist() for n in (6, 3, 8, 5)]
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    correct = torch.tensor([True, False, True, False])  # by sequence
    splits = [(0, 1), (2, 3)]
    settings = OptimizerSettings(lr=1e-3, weight_decay=0.0)
    loss_config = get_preset("dispo")
    num_tokens = response_token_count(range(4), responses)

    def micro(old: dict[int, list[float]] | None) -> list[Any]:
        return [
            build_microbatch(
                ix, prompts, responses, pad_token_id=0, old_logprobs=old, advantages=advantages, correct=correct
            )
            for ix in splits
        ]

    def update(policy: MegatronPolicy, old: dict[int, list[float]] | None, captured: dict | None) -> dict:
        result = policy.train_minibatch(
            micro(old), loss_config, num_global_tokens=num_tokens, num_global_sequences=4,
            old_logprobs="given" if old is not None else "capture",
        )  # fmt: skip
        if captured is not None:
            captured.update(result.captured_old_logprobs)
        return result.metrics

    reference = MegatronPolicy(hf_dir, ParallelConfig(), settings)
    separate_old = reference.response_logprobs(micro(None))
    reference_metrics = update(reference, separate_old, None)

    on_policy = MegatronPolicy(hf_dir, ParallelConfig(), settings)
    captured: dict[int, list[float]] = {}
    on_policy_metrics = update(on_policy, None, captured)

    weight_diff = max(
        float((a - b).abs().max())
        for a, b in zip(reference.model.parameters(), on_policy.model.parameters(), strict=True)
    )
    moved = max(
        float((a - b).abs().max())
        for a, b in zip(
            reference.model.parameters(), MegatronPolicy(hf_dir, ParallelConfig(), settings).model.parameters(),
            strict=True,
        )
    )  # fmt: skip
    return {
        "separate_old": separate_old,
        "captured": captured,
        "reference": reference_metrics,
        "on_policy": on_policy_metrics,
        "weight_diff": weight_diff,
        "moved": moved,
    }


@pytest.mark.timeout(240)
def test_first_update_on_policy_equals_separate_pi_old_forward(tiny_checkpoints: dict[str, Path]) -> None:
    (result,) = run_workers(_on_policy_worker, 1, timeout_s=200, args=(str(tiny_checkpoints["dense"]),))
    separate, captured = result["separate_old"], result["captured"]
    assert sorted(captured) == sorted(separate) == [0, 1, 2, 3]
    for index, values in separate.items():
        assert len(captured[index]) == len(values)
        assert torch.allclose(torch.tensor(captured[index]), torch.tensor(values), atol=1e-5, rtol=0)
    reference, on_policy = result["reference"], result["on_policy"]
    assert on_policy["loss"] == pytest.approx(reference["loss"], rel=1e-5, abs=1e-7)
    assert on_policy["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
    assert on_policy["entropy"] == pytest.approx(reference["entropy"], rel=1e-6)
    assert result["moved"] > 1e-4  # the update really changed the weights ...
    assert result["weight_diff"] < 1e-6  # ... and both ways of getting pi_old changed them the same
    # r = 1 exactly on the on-policy update: no token in any regime, nothing clipped, |log r| = 0
    for k in range(1, 5):
        assert on_policy[f"regime{k}/token_frac"] == 0.0
    assert on_policy["clip_frac"] == 0.0 and on_policy["log_ratio_abs_mean"] == 0.0
