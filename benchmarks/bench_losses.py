"""Benchmark of the policy loss and the repetition detector (plain script, not a test).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_losses.py [--batch 64] [--seq 4096] [--repeats 30]

Prints:
  1. forward+backward of compute_policy_loss (DISPO preset, validation and telemetry included) and of a plain masked
     cross-entropy -sum(logprobs * mask) / N on the same [batch, seq] tensors, timed in alternation, and the ratio;
  2. detect_repetition, microseconds per call on a 4k-token sequence (no loop / n-gram loop / confident run).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Callable

import torch

from megatron_dispo.algorithms import RepetitionConfig, compute_policy_loss, detect_repetition, get_preset

CLOCK = time.thread_time
"""CPU time of this thread: unlike wall time it does not count the time the process sits preempted, so figures stay
comparable on a shared machine (run with OMP_NUM_THREADS=1 so that torch works on this thread only)."""


def median_ms(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median CPU time (ms) per call of each function, measured in alternation so load changes hit all alike."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = CLOCK()
            fn()
            samples[name].append((CLOCK() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_loss(batch: int, seq: int, repeats: int) -> None:
    generator = torch.Generator().manual_seed(0)
    logprobs = (-torch.rand(batch, seq, generator=generator) * 3.0).requires_grad_()
    old_logprobs = logprobs.detach() + 0.3 * torch.randn(batch, seq, generator=generator)
    lengths = torch.randint(seq // 4, seq + 1, (batch,), generator=generator)
    mask = (torch.arange(seq).unsqueeze(0) < lengths.unsqueeze(1)).float()
    advantages = torch.randn(batch, generator=generator)
    num_tokens = float(mask.sum())
    config = get_preset("dispo")

    def masked_cross_entropy() -> None:
        logprobs.grad = None
        loss = -(logprobs * mask).sum() / num_tokens
        loss.backward()

    def dispo() -> None:
        logprobs.grad = None
        loss, _ = compute_policy_loss(logprobs, old_logprobs, advantages, mask, config, num_global_tokens=num_tokens)
        loss.backward()

    times = median_ms({"ce": masked_cross_entropy, "dispo": dispo}, repeats)
    print(f"masked cross-entropy fwd+bwd [{batch}, {seq}]: {times['ce']:.3f} ms")
    print(f"DISPO compute_policy_loss fwd+bwd (validation, telemetry): {times['dispo']:.3f} ms")
    print(f"  ratio DISPO / masked CE: {times['dispo'] / times['ce']:.2f}x")


def bench_repetition(length: int, repeats: int) -> None:
    config = RepetitionConfig()
    rng = random.Random(0)
    no_loop = [rng.randrange(150_000) for _ in range(length)]
    loop = no_loop[: length - 640] + [11, 22, 33, 44, 55, 66, 77, 88, 99, 111] * 64
    confident_logprobs = [math.log(0.5)] * (length - 512) + [math.log(0.999)] * 512
    cases = {
        "no loop (worst common case)": (no_loop, None),
        "n-gram loop, period 10, 640-token tail": (loop, None),
        "confident run, 512 tokens p=0.999": (no_loop, confident_logprobs),
    }
    calls = 200
    for label, (tokens, logprobs) in cases.items():
        per_call_ms = median_ms(
            {label: lambda t=tokens, lp=logprobs: [detect_repetition(t, config, lp) for _ in range(calls)]}, repeats
        )[label]
        hit = detect_repetition(tokens, config, logprobs)
        print(f"detect_repetition [{length} tokens] {label}: {per_call_ms / calls * 1e3:.1f} us/call -> {hit}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, clock: thread CPU time (median)")
    bench_loss(args.batch, args.seq, args.repeats)
    bench_repetition(4096, max(5, args.repeats // 3))


if __name__ == "__main__":
    main()
