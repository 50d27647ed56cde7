"""Benchmark of the policy loss and the repetition detector (plain script, not a test).

    .venv/bin/python benchmarks/bench_losses.py [--batch 64] [--seq 4096] [--repeats 30]

Prints, each against a baseline measured in the same run:
  1. forward+backward of compute_policy_loss (DISPO preset, telemetry included; on CPU the one-pass kernel of
     fused_cpu.py, and for reference the eager path) vs a plain masked cross-entropy -sum(logprobs * mask) / N on
     the same [batch, seq] tensors (target: < 1.5x);
  2. DISPO on the whole batch vs the same batch as 32 micro-batches (with num_global_tokens);
  3. detect_repetition, microseconds per call on a 4k-token sequence (no loop / n-gram loop / confident run).
"""

from __future__ import annotations

import argparse
import ctypes
import math
import random
import resource
import statistics
import time
from collections.abc import Callable

import torch

from megatron_dispo.algorithms import RepetitionConfig, compute_policy_loss, detect_repetition, fused_cpu, get_preset

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


def warm_allocator() -> None:
    """Same effect as MALLOC_MMAP_THRESHOLD_=134217728 MALLOC_TRIM_THRESHOLD_=268435456: glibc serves the 1 MB
    tensors from its heap and never hands freed memory back, as in a long-running training process; the timings
    then compare arithmetic, not first touches of fresh pages."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    if not (libc.mallopt(m_mmap_threshold, 128 << 20) and libc.mallopt(m_trim_threshold, 256 << 20)):
        raise RuntimeError("mallopt failed; run with --allocator default")


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

    def split(num_micro_batches: int) -> list[tuple[torch.Tensor, ...]]:
        """Micro-batches as separate leaf tensors, as each micro-batch's own forward would produce them (a view of one
        leaf would add a split backward that copies the whole gradient)."""
        parts = [data[key].chunk(num_micro_batches) for key in ("logprobs", "old_logprobs", "advantages", "mask")]
        return [(lp.clone().requires_grad_(), old, adv, mask) for lp, old, adv, mask in zip(*parts, strict=True)]

    micro_batches = {1: [(logprobs, data["old_logprobs"], data["advantages"], data["mask"])], 32: split(32)}

    def dispo(num_micro_batches: int = 1) -> None:
        for lp, old, adv, mask in micro_batches[num_micro_batches]:
            lp.grad = None
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

    def eager_dispo() -> None:
        """compute_policy_loss with the one-pass CPU kernel turned off (the path CUDA tensors take)."""
        fused_cpu.ENABLED = False
        try:
            dispo()
        finally:
            fused_cpu.ENABLED = True

    if fused_cpu.kernel() is None:
        print("WARNING: the fused CPU kernel is unavailable here, so 'DISPO' below is the eager path")
    # Each variant is timed in alternation with its own baseline only: a variant that sweeps several MB (the eager
    # path, the bare formula) evicts the others' tensors from the 1-2 MB L2 cache and would slow whatever runs next.
    main = interleaved_ms({"ce": masked_cross_entropy, "dispo": dispo}, repeats)
    (baseline, ce_faults), (one, one_faults) = main["ce"], main["dispo"]
    print(f"masked cross-entropy fwd+bwd [{batch}, {seq}]: {baseline:.3f} ms ({ce_faults:.0f} page faults/call)")
    print(f"DISPO compute_policy_loss fwd+bwd (telemetry, validation): {one:.3f} ms ({one_faults:.0f} faults/call)")
    print(f"  ratio DISPO / masked CE: {one / baseline:.2f}x (target < 1.5x)")
    if ce_faults > 0 or one_faults > 0:
        print("  (page faults were paid this run; see the docstring of interleaved_ms and --allocator)")
    for label, fn in (
        ("DISPO, eager path (kernel off)", eager_dispo),
        ("bare DISPO formula in eager torch (no validation, no telemetry)", minimal_dispo),
    ):
        pair = interleaved_ms({"ce": masked_cross_entropy, "variant": fn}, repeats)
        print(
            f"{label}: {pair['variant'][0]:.3f} ms ({pair['variant'][1]:.0f} page faults/call), "
            f"{pair['variant'][0] / pair['ce'][0]:.2f}x masked CE ({pair['ce'][0]:.3f} ms)"
        )
    by_split = interleaved_ms({"dispo": dispo, "dispo32": lambda: dispo(32)}, repeats)
    many = by_split["dispo32"][0]
    print(f"DISPO as 32 micro-batches of [{batch // 32}, {seq}]: {many:.3f} ms")
    print(f"  ratio 32 micro-batches / 1: {many / by_split['dispo'][0]:.2f}x")


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
    parser.add_argument(
        "--allocator",
        choices=["warm", "default"],
        default="warm",
        help="warm: glibc keeps freed memory (mallopt), so no variant pays first-touch page faults; default: glibc's "
        "own thresholds, where whichever variant allocates after a heap trim pays them (see interleaved_ms)",
    )
    args = parser.parse_args()
    if args.allocator == "warm":
        warm_allocator()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, clock: thread CPU time (median), "
        f"allocator: {args.allocator}"
    )
    bench_loss(args.batch, args.seq, args.repeats)
    bench_repetition(4096, max(5, args.repeats // 3))


if __name__ == "__main__":
    main()
