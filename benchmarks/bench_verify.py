"""Verification throughput on MATH-500: process pool with 1 vs 2 workers, and pool vs inline math-verify.

Responses are built from the MATH-500 reference answers, four per problem as in a small rollout group: two right
(``\\boxed{gold}`` and ``Answer: gold``: cheap string path) and two wrong (the answers of two other problems: full
math-verify path). Baseline: the same extraction and checks called inline in this process (no pool, no IPC).
Each timed run uses a fresh pool (fresh gold caches, as for a new training batch); start-up is reported apart.
Runs are interleaved (inline, 1 worker, 2 workers, repeat) so that load from other processes hits all alike.

Usage: python benchmarks/bench_verify.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time

from megatron_dispo.data import load_math500
from megatron_dispo.rewards import VerifierPool, extract_answer, reference_answer, verify_batch
from megatron_dispo.rewards.equivalence import GoldCache, check_equivalence


def build_responses() -> tuple[list[str], list[str]]:
    golds = [problem.answer for problem in load_math500()]
    responses, targets = [], []
    for index, gold in enumerate(golds):
        responses += [
            f"Reasoning...\nSo the answer is $\\boxed{{{gold}}}$.",
            f"Reasoning...\nAnswer: {gold}",
            f"\\boxed{{{golds[(index + 1) % len(golds)]}}}",
            f"\\boxed{{{golds[(index + 7) % len(golds)]}}}",
        ]
        targets += [gold] * 4
    return responses, targets


def run_inline(responses: list[str], golds: list[str], timeout_s: float) -> tuple[float, int]:
    """Same extraction and equivalence check, called directly (fresh gold cache, like a fresh worker)."""
    cache = GoldCache()
    start = time.perf_counter()
    correct = 0
    for response, gold in zip(responses, golds, strict=True):
        answer = extract_answer(response, "auto")
        if answer is not None:
            verdict = check_equivalence(reference_answer(gold), answer, timeout_s=timeout_s, gold_cache=cache)
            correct += verdict == "correct"
    return time.perf_counter() - start, correct


def run_pool(num_workers: int, responses: list[str], golds: list[str], timeout_s: float) -> tuple[float, int, float]:
    """(seconds for the batch, correct count, start-up seconds) with a fresh pool."""
    start = time.perf_counter()
    pool = VerifierPool(num_workers=num_workers)
    pool.wait_ready()
    startup = time.perf_counter() - start
    try:
        start = time.perf_counter()
        results = verify_batch(responses, golds, timeout_s=timeout_s, pool=pool)
        return time.perf_counter() - start, sum(r.correct for r in results), startup
    finally:
        pool.close()


def _forkserver_child(connection) -> None:  # runs in the child
    connection.send("ready")
    connection.close()


def forkserver_startup() -> tuple[float, float]:
    """Start-up of a multiprocessing forkserver child with math_verify preloaded: first (starts the server), next."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["math_verify"])
    times = []
    for _ in range(2):
        start = time.perf_counter()
        parent, child = context.Pipe()
        process = context.Process(target=_forkserver_child, args=(child,))
        process.start()
        parent.recv()
        process.join()
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions; the median is reported")
    parser.add_argument("--timeout-s", type=float, default=5.0)
    args = parser.parse_args()
    responses, golds = build_responses()
    count = len(responses)
    load = os.getloadavg()[0]
    print(f"MATH-500: {count} responses (50% right, 50% wrong); cpu_count={os.cpu_count()}, load avg {load:.1f}")

    inline_s, pool_s, startup_s, correct = [], {1: [], 2: []}, {1: [], 2: []}, set()
    for repeat in range(args.repeats):
        seconds, right = run_inline(responses, golds, args.timeout_s)
        inline_s.append(seconds)
        correct.add(right)
        for workers in (1, 2):
            seconds, right, startup = run_pool(workers, responses, golds, args.timeout_s)
            pool_s[workers].append(seconds)
            startup_s[workers].append(startup)
            correct.add(right)
        print(
            f"  repeat {repeat + 1}/{args.repeats}: inline {inline_s[-1]:.2f} s, pool(1) {pool_s[1][-1]:.2f} s, "
            f"pool(2) {pool_s[2][-1]:.2f} s"
        )
    if len(correct) != 1:
        raise RuntimeError(f"inline and pool runs disagree on the number of correct answers: {sorted(correct)}")
    inline_median = statistics.median(inline_s)
    medians = {workers: statistics.median(times) for workers, times in pool_s.items()}
    print(f"correct answers in every run: {correct.pop()} of {count}")
    print(f"inline math-verify (baseline): {count / inline_median:7.0f} answers/s")
    for workers in (1, 2):
        print(
            f"pool, {workers} worker(s):          {count / medians[workers]:7.0f} answers/s   "
            f"(start-up {statistics.median(startup_s[workers]):.2f} s)"
        )
    print(f"pool(1) / inline time (IPC overhead):   {medians[1] / inline_median:.2f}x")
    print(f"pool(2) speed-up over pool(1):          {medians[1] / medians[2]:.2f}x")
    first, second = forkserver_startup()
    print(f"for comparison, forkserver+preload start-up: first {first:.2f} s, next {second:.3f} s")
    print(f"load avg at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
