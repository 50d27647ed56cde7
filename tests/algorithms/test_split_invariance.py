"""One micro-batch vs 4 micro-batches vs 2 simulated data-parallel ranks (2 micro-batches each): the summed losses,
gradients and reduced telemetry (per token version lag included) equal the single-batch result to 1e-6 relative, for
every loss."""

from __future__ import annotations

import pytest
import torch

from megatron_dispo.algorithms import compute_policy_loss, get_preset, preset_names, reduce_metrics
from megatron_dispo.algorithms.telemetry import pack_metrics, unpack_metrics

NUM_GPUS = 0


def make_batch(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    batch, seq = 8, 24
    logprobs = -torch.rand(batch, seq, generator=generator, dtype=dtype) * 3
    old = logprobs + 0.6 * torch.randn(batch, seq, generator=generator, dtype=dtype)
    lengths = torch.tensor([24, 3, 17, 0, 9, 24, 1, 12])  # row 3 is empty: legal inside a larger mini-batch
    mask = torch.arange(seq).unsqueeze(0) < lengths.unsqueeze(1)
    return {
        "logprobs": logprobs,
        "old": old,
        "advantages": torch.randn(batch, generator=generator, dtype=dtype),
        "mask": mask,
        "correct": torch.tensor([1, 0, 1, 1, 0, 0, 1, 0]).bool(),
        "entropy": torch.rand(batch, seq, generator=generator, dtype=dtype) * 2,
        "segment_ids": torch.div(torch.arange(seq), 5, rounding_mode="floor").expand(batch, seq).contiguous(),
        "token_lag": torch.randint(0, 3, (batch, seq), generator=generator),
    }


def run_split(data: dict[str, torch.Tensor], preset: str, splits: list[list[int]]) -> tuple[float, torch.Tensor, dict]:
    """Run each index group as one call with the global normalisers; return summed loss, gradient and metrics."""
    config = get_preset(preset, condition_on="correctness") if preset == "dispo" else get_preset(preset)
    num_tokens = int(data["mask"].sum())
    num_sequences = int((data["mask"].sum(1) > 0).sum())
    leaf = data["logprobs"].clone().requires_grad_()
    total, parts = 0.0, []
    for rows in splits:
        index = torch.tensor(rows)
        loss, metrics = compute_policy_loss(
            leaf[index],
            data["old"][index],
            data["advantages"][index],
            data["mask"][index],
            config,
            correct=data["correct"][index],
            num_global_tokens=num_tokens,
            num_global_sequences=num_sequences,
            entropy=data["entropy"][index],
            segment_ids=data["segment_ids"][index],
            token_lag=data["token_lag"][index],
            num_lags=3,
        )
        loss.backward()
        total += loss.item()
        parts.append(metrics)
    return total, leaf.grad, reduce_metrics(parts)


ONE = [[0, 1, 2, 3, 4, 5, 6, 7]]
FOUR_MICRO = [[0, 1], [2, 3], [4, 5], [6, 7]]
UNEVEN = [[0], [1, 2, 3], [4, 5, 6], [7]]
# two DP ranks with two micro-batches each; DP gradient reduction is a SUM (all_reduce) of the per-rank grads
RANK0, RANK1 = [[0, 1], [2, 3]], [[4, 5], [6, 7]]


@pytest.mark.parametrize("preset", preset_names())
def test_split_invariance_every_loss(preset: str) -> None:
    data = make_batch(torch.float64)
    full_loss, full_grad, full_metrics = run_split(data, preset, ONE)
    assert full_grad.abs().sum() > 0
    for splits in (FOUR_MICRO, UNEVEN):
        loss, grad, metrics = run_split(data, preset, splits)
        assert loss == pytest.approx(full_loss, rel=1e-6, abs=1e-12)
        torch.testing.assert_close(grad, full_grad, rtol=1e-6, atol=1e-12)
        assert metrics == pytest.approx(full_metrics, rel=1e-6, abs=1e-12)
    loss0, grad0, metrics0 = run_split(data, preset, RANK0)
    loss1, grad1, metrics1 = run_split(data, preset, RANK1)
    assert loss0 + loss1 == pytest.approx(full_loss, rel=1e-6, abs=1e-12)
    torch.testing.assert_close(grad0 + grad1, full_grad, rtol=1e-6, atol=1e-12)
    # ranks reduce telemetry with one all_reduce(SUM) of the packed vectors
    summed = [a + b for a, b in zip(pack_metrics(metrics0, 3), pack_metrics(metrics1, 3), strict=True)]
    assert unpack_metrics(summed, 3) == pytest.approx(full_metrics, rel=1e-6, abs=1e-12)
    assert full_metrics["lag2/regime1/token_frac"] > 0.0  # the per-lag statistics (3 lags) are part of the check


def test_split_invariance_float32_dispo() -> None:
    data = make_batch(torch.float32, seed=5)
    full_loss, full_grad, full_metrics = run_split(data, "dispo", ONE)
    loss, grad, metrics = run_split(data, "dispo", FOUR_MICRO)
    assert loss == pytest.approx(full_loss, rel=1e-5)
    torch.testing.assert_close(grad, full_grad, rtol=1e-6, atol=1e-9)
    assert metrics == pytest.approx(full_metrics, rel=1e-5, abs=1e-7)


def test_without_global_normaliser_each_call_normalises_by_its_own_mask() -> None:
    data = make_batch(torch.float64)
    config = get_preset("dispo")
    index = torch.tensor([0, 1])
    local, _ = compute_policy_loss(
        data["logprobs"][index], data["old"][index], data["advantages"][index], data["mask"][index], config
    )
    tokens = int(data["mask"][index].sum())
    scaled, _ = compute_policy_loss(
        data["logprobs"][index],
        data["old"][index],
        data["advantages"][index],
        data["mask"][index],
        config,
        num_global_tokens=2 * tokens,
    )
    assert scaled.item() == pytest.approx(local.item() / 2, rel=1e-12)
