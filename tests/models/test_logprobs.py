"""Chunked vocab-parallel log-probs / entropy (megatron_dispo.models.logprobs) against closed forms and plain autograd.

TP=1 runs in-process; TP=2 splits the same logits over two gloo ranks and must reproduce the full-vocabulary values and
each rank's slice of the full gradient.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_dispo.models.logprobs import naive_logprobs_entropy, vocab_parallel_logprobs_entropy
from tests.models.distributed import run_workers

NUM_GPUS = 0


def test_closed_form_uniform_and_two_token_distribution() -> None:
    # Uniform logits over V=8: log p = -log 8, entropy = log 8, whatever the temperature.
    logits = torch.zeros(1, 3, 8)
    target = torch.tensor([[0, 5, 7]])
    logprobs, entropy = vocab_parallel_logprobs_entropy(logits, target, tp_group=None, temperature=0.5)
    torch.testing.assert_close(logprobs, torch.full((1, 3), -math.log(8)))
    torch.testing.assert_close(entropy, torch.full((1, 3), math.log(8)))
    # Logits (ln 3, 0) at T=1: p = (3/4, 1/4); H = -(3/4 ln 3/4 + 1/4 ln 1/4). Padding column (index 2) excluded.
    logits = torch.tensor([[[math.log(3.0), 0.0, 100.0]]])
    logprobs, entropy = vocab_parallel_logprobs_entropy(logits, torch.tensor([[1]]), tp_group=None, vocab_size=2)
    torch.testing.assert_close(logprobs, torch.tensor([[math.log(0.25)]]))
    expected_h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    torch.testing.assert_close(entropy, torch.tensor([[expected_h]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("temperature", "vocab_size", "chunk"), [(1.0, None, 3), (0.7, 45, 4), (1.3, 50, 1000)])
def test_chunked_equals_naive_values_and_gradients(
    dtype: torch.dtype, temperature: float, vocab_size: int | None, chunk: int
) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 50, generator=generator) * 3).to(dtype).requires_grad_()
    target = torch.randint(0, vocab_size or 50, (3, 7), generator=generator)
    weight_lp, weight_h = torch.randn(3, 7, generator=generator), torch.randn(3, 7, generator=generator)
    before = logits.detach().clone()
    logprobs, entropy = vocab_parallel_logprobs_entropy(
        logits, target, tp_group=None, temperature=temperature, vocab_size=vocab_size, chunk_tokens=chunk
    )
    (logprobs * weight_lp + entropy * weight_h).sum().backward()
    chunked_grad, logits.grad = logits.grad.clone(), None
    assert torch.equal(logits.detach(), before), "the input logits must never be modified"
    ref_lp, ref_h = naive_logprobs_entropy(logits, target, temperature=temperature, vocab_size=vocab_size)
    (ref_lp * weight_lp + ref_h * weight_h).sum().backward()
    assert logprobs.dtype == torch.float32 and entropy.dtype == torch.float32
    torch.testing.assert_close(logprobs, ref_lp, atol=2e-6, rtol=0)
    torch.testing.assert_close(entropy, ref_h, atol=2e-6, rtol=0)
    assert chunked_grad.dtype == dtype
    torch.testing.assert_close(chunked_grad.float(), logits.grad.float(), atol=4e-6, rtol=0)


def test_shifted_slice_input_is_handled_without_a_copy_and_matches_naive() -> None:
    # logits[:, :-1] (next-token shift) cannot be flattened as a view; it is walked per batch row instead.
    generator = torch.Generator().manual_seed(2)
    full = torch.randn(3, 6, 20, generator=generator, requires_grad=True)
    target = torch.randint(0, 20, (3, 5), generator=generator)
    logprobs, entropy = vocab_parallel_logprobs_entropy(full[:, :-1], target, tp_group=None, chunk_tokens=2)
    (logprobs.sum() + 0.5 * entropy.sum()).backward()
    chunked_grad, full.grad = full.grad.clone(), None
    ref_lp, ref_h = naive_logprobs_entropy(full[:, :-1], target)
    (ref_lp.sum() + 0.5 * ref_h.sum()).backward()
    torch.testing.assert_close(logprobs, ref_lp, atol=2e-6, rtol=0)
    torch.testing.assert_close(entropy, ref_h, atol=2e-6, rtol=0)
    torch.testing.assert_close(chunked_grad, full.grad, atol=2e-6, rtol=0)
    assert torch.count_nonzero(chunked_grad[:, -1]) == 0  # the dropped last position gets no gradient


def test_gradcheck_float64_and_logprob_only_path() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    target = torch.randint(0, 5, (2, 3), generator=generator)

    def both(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lp, h = vocab_parallel_logprobs_entropy(x, target, tp_group=None, temperature=0.8, vocab_size=5, chunk_tokens=2)
        return lp, h

    assert torch.autograd.gradcheck(both, (logits,))
    logprobs, entropy = vocab_parallel_logprobs_entropy(logits, target, tp_group=None, compute_entropy=False)
    assert entropy is None
    logprobs.sum().backward()
    ref = naive_logprobs_entropy(logits.detach().requires_grad_(), target)[0]
    torch.testing.assert_close(logprobs, ref, atol=1e-12, rtol=0)


def test_bad_inputs_name_the_problem() -> None:
    logits = torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match="target shape"):
        vocab_parallel_logprobs_entropy(logits, torch.zeros(2, 4, dtype=torch.long), tp_group=None)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs_entropy(logits, torch.zeros(2, 3, dtype=torch.long), tp_group=None, temperature=0)
    with pytest.raises(ValueError, match="target ids"):
        vocab_parallel_logprobs_entropy(logits, torch.full((2, 3), 8), tp_group=None)
    with pytest.raises(TypeError, match="integer token ids"):
        vocab_parallel_logprobs_entropy(logits, torch.zeros(2, 3), tp_group=None)


def _tp2_worker() -> dict[str, float]:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out: dict[str, float] = {}
    # vocab_size=7 of 16 columns: rank 1's shard is all padding (exercises the empty-shard path).
    for label, vocab_size, temperature in (("full", None, 1.0), ("padded", 13, 0.6), ("empty_shard", 7, 1.0)):
        generator = torch.Generator().manual_seed(5)
        full = torch.randn(2, 9, 16, generator=generator, dtype=torch.float32) * 2
        target = torch.randint(0, vocab_size or 16, (2, 9), generator=generator)
        weight_lp, weight_h = torch.randn(2, 9, generator=generator), torch.randn(2, 9, generator=generator)
        local = full[..., rank * 8 : (rank + 1) * 8].clone().requires_grad_()
        logprobs, entropy = vocab_parallel_logprobs_entropy(
            local, target, tp_group=dist.group.WORLD, temperature=temperature, vocab_size=vocab_size, chunk_tokens=4
        )
        (logprobs * weight_lp + entropy * weight_h).sum().backward()
        ref_input = full.clone().requires_grad_()
        ref_lp, ref_h = naive_logprobs_entropy(ref_input, target, temperature=temperature, vocab_size=vocab_size)
        (ref_lp * weight_lp + ref_h * weight_h).sum().backward()
        out[f"{label}/logprobs"] = (logprobs - ref_lp).abs().max().item()
        out[f"{label}/entropy"] = (entropy - ref_h).abs().max().item()
        out[f"{label}/grad"] = (local.grad - ref_input.grad[..., rank * 8 : (rank + 1) * 8]).abs().max().item()
    return out


def test_tp2_equals_full_vocabulary_naive() -> None:
    results = run_workers(_tp2_worker, 2, timeout_s=90)
    for rank, diffs in enumerate(results):
        for key, value in diffs.items():
            assert value <= 2e-6, f"rank {rank} {key}: max abs diff {value}"
