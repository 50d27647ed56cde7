"""Benchmark of the policy loss and the repetition detector (plain script, not a test).

    .venv/bin/python benchmarks/bench_losses.py [--batch 64] [--seq 4096] [--repeats 30]

Prints, each against a baseline measured in the same run:
  1. forward+backward of compute_policy_loss (DISPO preset, telemetry included) vs a plain masked cross-entropy
     -sum(logprobs * mask) / N on the same [batch, seq] tensors (target: < 1.5x);
  2. DISPO on the whole batch vs the same batch as 32 micro-batches (with num_global_tokens);
  3. detect_repetition, microseconds per call on a 4k-token sequence (no loop / n-gram loop / confident run).
"""

from __future__ import annotations

import argparse
import math
import random
import resource
import statistics
import time
from collections.abc import Callable

import torch

from megatron_dispo.algorithms import RepetitionConfig, compute_policy_loss, detect_repetition, get_preset

CLOCK = time.thread_time
"""CPU time of this thread (torch runs single-threaded here, see --threads): unlike wall time it does not count the
time the process sits preempted, so figures stay comparable on a shared, oversubscribed machine."""


def time_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median CPU time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = CLOCK()
        fn()
        samples.append((CLOCK() - start) * 1e3)
    return statistics.median(samples)


def minor_faults() -> int:
    """Minor page faults of the process so far: first touches of freshly mapped memory (see `interleaved_ms`)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved_ms(candidates: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """Median CPU time (ms) and median minor page faults per call of several functions measured in alternation, so
    load changes hit all of them alike.

    Faults matter here: glibc returns freed 1 MB buffers to the kernel when the heap's free top grows past its trim
    threshold, and the next function to allocate pays ~1-3 us per 4 KB page on first touch (~0.3-0.7 ms per MB on
    this machine), which can be most of a small baseline's time. Which function pays depends on what ran before it,
    so the fault counts are reported next to the times."""
    for fn in candidates.values():
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    faults: dict[str, list[int]] = {name: [] for name in candidates}
    for step in range(repeats):
        for name, fn in candidates.items():
            faults_before = minor_faults()
            start = CLOCK()
            fn()
            samples[name].append((CLOCK() - start) * 1e3)
            faults[name].append(minor_faults() - faults_before)
        if (step + 1) % max(1, repeats // 4) == 0:
            print(f"  ... {step + 1}/{repeats} rounds", flush=True)
    return {name: (statistics.median(samples[name]), statistics.median(faults[name])) for name in candidates}


def make_batch(batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(batch, seq, generator=generator) * 3.0
    old_logprobs = logprobs + 0.3 * torch.randn(batch, seq, generator=generator)
    lengths = torch.randint(seq // 4, seq + 1, (batch,), generator=generator)
    mask = (torch.arange(seq).unsqueeze(0) < lengths.unsqueeze(1)).float()
    advantages = torch.randn(batch, generator=generator)
    return {"logprobs": logprobs, "old_logprobs": old_logprobs, "mask": mask, "advantages": advantages}


def bench_loss(batch: int, seq: int, repeats: int) -> None:
    data = make_batch(batch, seq)
    config = get_preset("dispo")
    num_tokens = float(data["mask"].sum())
    logprobs = data["logprobs"].clone().requires_grad_()

    def masked_cross_entropy() -> None:
        logprobs.grad = None
        loss = -(logprobs * data["mask"]).sum() / num_tokens
        loss.backward()

    def dispo(num_micro_batches: int = 1) -> None:
        logprobs.grad = None
        for lp, old, adv, mask in zip(
            logprobs.chunk(num_micro_batches),
            data["old_logprobs"].chunk(num_micro_batches),
            data["advantages"].chunk(num_micro_batches),
            data["mask"].chunk(num_micro_batches),
            strict=True,
        ):
            loss, _ = compute_policy_loss(lp, old, adv, mask, config, num_global_tokens=num_tokens)
            loss.backward()

    positive = (data["advantages"] > 0).unsqueeze(1)
    low = torch.where(positive, 0.8, 0.0)
    high = torch.where(positive, 11.0, 101.0)
    scaled_advantages = data["advantages"].unsqueeze(1) / num_tokens

    def minimal_dispo() -> None:
        """The bare DISPO formula in eager torch, for reference: no validation, no telemetry."""
        logprobs.grad = None
        weight = torch.exp(logprobs.detach() - data["old_logprobs"]).clamp_(low, high)
        loss = -(weight.mul_(data["mask"]).mul_(scaled_advantages) * logprobs).sum()
        loss.backward()

    results = interleaved_ms(
        {"ce": masked_cross_entropy, "minimal": minimal_dispo, "dispo": dispo, "dispo32": lambda: dispo(32)},
        repeats,
    )
    times = {name: ms for name, (ms, _) in results.items()}
    faults = {name: count for name, (_, count) in results.items()}
    baseline, one, many = times["ce"], times["dispo"], times["dispo32"]
    print(f"masked cross-entropy fwd+bwd [{batch}, {seq}]: {baseline:.3f} ms ({faults['ce']:.0f} page faults/call)")
    print(
        f"bare DISPO formula fwd+bwd (no validation, no telemetry): {times['minimal']:.3f} ms "
        f"({faults['minimal']:.0f} page faults/call)"
    )
    print(f"  ratio bare DISPO / masked CE: {times['minimal'] / baseline:.2f}x")
    print(
        f"DISPO compute_policy_loss fwd+bwd (+telemetry, validation): {one:.3f} ms "
        f"({faults['dispo']:.0f} page faults/call)"
    )
    print(f"  ratio DISPO / masked CE: {one / baseline:.2f}x (target < 1.5x)")
    if faults["ce"] > 0:
        print("  (the baseline paid page faults this run; see the docstring of interleaved_ms)")
    print(f"DISPO as 32 micro-batches of [{batch // 32}, {seq}]: {many:.3f} ms")
    print(f"  ratio 32 micro-batches / 1: {many / one:.2f}x")


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
        per_call_ms = time_ms(
            lambda t=tokens, lp=logprobs: [detect_repetition(t, config, lp) for _ in range(calls)], repeats
        )
        hit = detect_repetition(tokens, config, logprobs)
        print(f"detect_repetition [{length} tokens] {label}: {per_call_ms / calls * 1e3:.1f} us/call -> {hit}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared box)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, clock: thread CPU time (median)")
    bench_loss(args.batch, args.seq, args.repeats)
    bench_repetition(4096, max(5, args.repeats // 3))


if __name__ == "__main__":
    main()
