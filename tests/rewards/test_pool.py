"""The worker pool: hard per-answer timeout from a worker thread, replacement of killed workers, thread safety."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from megatron_dispo.rewards import VerifierPool, VerifyResult, verify_batch

PATHOLOGICAL = "\\boxed{9^{9^{9}}}"  # sympy tries to evaluate a 370-million-digit power
TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def pool() -> Iterator[VerifierPool]:
    pool = VerifierPool(num_workers=2)
    pool.wait_ready()
    yield pool
    pool.close()


def _in_thread(function) -> tuple[object, float]:
    box: dict[str, object] = {}

    def target() -> None:
        start = time.monotonic()
        box["value"] = function()
        box["elapsed"] = time.monotonic() - start

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "verify_batch hung the calling thread"
    return box["value"], box["elapsed"]  # type: ignore[return-value]


def test_pathological_answer_times_out_from_a_worker_thread_and_worker_is_replaced(pool: VerifierPool) -> None:
    pool.wait_ready()
    pids_before = set(pool.worker_pids)
    restarts_before = pool.restarts
    results, elapsed = _in_thread(lambda: verify_batch([PATHOLOGICAL], ["1"], timeout_s=TIMEOUT_S, pool=pool))
    [result] = results  # type: ignore[misc]
    assert result.outcome == "timeout" and result.reward == -1.0
    assert result.extracted == "9^{9^{9}}"
    assert "killed" in result.detail
    assert elapsed < TIMEOUT_S + 1.0
    assert pool.restarts == restarts_before + 1
    assert len(set(pool.worker_pids) - pids_before) == 1

    # Later answers (in the same batch as another hang, and afterwards) still verify.
    mixed = verify_batch(
        ["\\boxed{\\frac{1}{2}}", PATHOLOGICAL, "\\boxed{3}", "Answer: 7"],
        ["0.5", "1", "4", "7"],
        timeout_s=TIMEOUT_S,
        pool=pool,
    )
    assert [r.outcome for r in mixed] == ["correct", "timeout", "incorrect", "correct"]


def test_workers_killed_while_idle_are_replaced_and_answers_still_verify(pool: VerifierPool) -> None:
    for pid in pool.worker_pids:
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    results = verify_batch(["\\boxed{2\\sqrt{2}}", "\\boxed{3}"] * 3, ["\\sqrt{8}", "4"] * 3, pool=pool)
    assert [r.outcome for r in results] == ["correct", "incorrect"] * 3


def test_worker_dying_mid_answer_gives_error_not_a_silent_wrong(pool: VerifierPool) -> None:
    pool.wait_ready()

    def kill_busy_worker_soon() -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while len(pool.busy_worker_pids) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(pool.busy_worker_pids[0], signal.SIGKILL)

    killer = threading.Thread(target=kill_busy_worker_soon)
    killer.start()
    # Both workers are busy with the hang when the first one is killed.
    results = verify_batch([PATHOLOGICAL, PATHOLOGICAL], ["1", "1"], timeout_s=TIMEOUT_S, pool=pool)
    killer.join()
    assert sorted(r.outcome for r in results) == ["error", "timeout"]
    error = next(r for r in results if r.outcome == "error")
    assert "died" in error.detail
    assert [r.outcome for r in verify_batch(["\\boxed{5}"], ["5"], pool=pool)] == ["correct"]


def test_concurrent_callers_from_threads_get_their_own_results(pool: VerifierPool) -> None:
    outputs: dict[int, list[VerifyResult]] = {}

    def call(offset: int) -> None:
        values = [offset + i for i in range(20)]
        responses = [f"\\boxed{{{v}}}" if v % 3 else f"\\boxed{{{v + 1}}}" for v in values]
        outputs[offset] = verify_batch(responses, [str(v) for v in values], pool=pool)

    threads = [threading.Thread(target=call, args=(offset,)) for offset in (0, 100, 200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for offset, results in outputs.items():
        expected = ["correct" if (offset + i) % 3 else "incorrect" for i in range(20)]
        assert [r.outcome for r in results] == expected
    assert len(outputs) == 3


def test_closed_pool_and_bad_sizes_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="num_workers=0"):
        VerifierPool(num_workers=0)
    closed = VerifierPool(num_workers=1)
    closed.close()
    with pytest.raises(RuntimeError, match="closed"):
        verify_batch(["\\boxed{1}"], ["1"], pool=closed)


def test_gold_affinity_queue_keeps_a_gold_on_one_slot_and_steals_when_idle() -> None:
    from megatron_dispo.rewards.pool import _GoldAffinityQueue

    golds = ["1", "2", "3", "4"] * 4  # four golds, four answers each
    queue = _GoldAffinityQueue(golds, num_slots=2)
    taken_by_slot: dict[int, list[int]] = {0: [], 1: []}
    while queue:
        for slot in (0, 1):
            if queue:
                taken_by_slot[slot].append(queue.pop_for(slot))
    assert sorted(taken_by_slot[0] + taken_by_slot[1]) == list(range(16))  # every answer exactly once
    assert abs(len(taken_by_slot[0]) - len(taken_by_slot[1])) <= 1  # stealing balances the load
    single = _GoldAffinityQueue(["7"] * 5, num_slots=3)
    assert [single.pop_for(2) for _ in range(5)] and not single  # a slot with an empty shard steals
