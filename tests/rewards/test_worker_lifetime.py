"""Verifier workers never outlive the process that owns the pool, however it ends.

Each case runs a real parent process that verifies answers with the shared pool, records every descendant it has
(they must all be verifier workers: no multiprocessing spawn child or resource_tracker), then ends by a normal exit,
an uncaught exception, SIGTERM or SIGKILL. For the signals a worker is busy with an answer whose evaluation holds
the GIL in one long C call (9^(9^9)), so neither its math-verify alarm nor a Python thread can stop it: only the
parent-death signal does. Every descendant must be gone within `GONE_WITHIN_S`.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from megatron_dispo.rewards import VerifierPool, verify_batch
from megatron_dispo.rewards._worker import watch_parent

REPO_ROOT = str(Path(__file__).resolve().parents[2])
GONE_WITHIN_S = 10.0
WORKER_MODULE = "megatron_dispo.rewards._worker"

PARENT = r"""
import json, sys, threading, time
from megatron_dispo.rewards import get_default_pool, verify_batch

mode = sys.argv[1]
results = verify_batch(["\\boxed{2}", "Answer: 3", "\\boxed{5}"], ["2", "3", "4"])  # the shared pool, closed atexit
assert [r.outcome for r in results] == ["correct", "correct", "incorrect"], results
print(json.dumps({"workers": get_default_pool().worker_pids}), flush=True)
sys.stdin.readline()  # the test records our descendants meanwhile
if mode == "exit":
    sys.exit(0)
if mode == "raise":
    raise RuntimeError("parent fails on purpose")

def report_busy():
    while not get_default_pool().busy_worker_pids:
        time.sleep(0.01)
    print(json.dumps({"busy": get_default_pool().busy_worker_pids}), flush=True)

threading.Thread(target=report_busy, daemon=True).start()
verify_batch(["\\boxed{9^{9^{9}}}"], ["1"], timeout_s=600.0)  # runs until the test signals us
print(json.dumps({"error": "the pathological answer finished"}), flush=True)
"""


def _start_parent(mode: str) -> tuple[subprocess.Popen[str], queue.Queue[dict[str, object]]]:
    env = dict(os.environ, MEGATRON_DISPO_VERIFY_WORKERS="2", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: queue.Queue[dict[str, object]] = queue.Queue()

    def read() -> None:
        assert parent.stdout is not None
        for line in parent.stdout:
            lines.put(json.loads(line))

    threading.Thread(target=read, daemon=True).start()
    return parent, lines


def _next_line(parent: subprocess.Popen[str], lines: queue.Queue[dict[str, object]]) -> dict[str, object]:
    try:
        return lines.get(timeout=60)
    except queue.Empty:
        parent.kill()
        _, stderr = parent.communicate(timeout=10)
        raise AssertionError(f"the parent printed nothing within 60 s; stderr:\n{stderr}") from None


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Still running: is_running() also rules out a recycled pid; a zombie has ended (waiting to be reaped)."""
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.parametrize("ending", ["exit", "raise", "sigterm", "sigkill"])
def test_workers_end_with_their_parent(ending: str) -> None:
    parent, lines = _start_parent({"sigterm": "signal", "sigkill": "signal"}.get(ending, ending))
    descendants: list[psutil.Process] = []
    try:
        worker_pids = _next_line(parent, lines)["workers"]
        descendants = psutil.Process(parent.pid).children(recursive=True)
        assert sorted(p.pid for p in descendants) == sorted(worker_pids)  # type: ignore[arg-type]
        for process in descendants:  # nothing but verifier workers: no spawn child, no resource_tracker
            assert WORKER_MODULE in process.cmdline(), process.cmdline()
        assert parent.stdin is not None
        parent.stdin.write("go\n")
        parent.stdin.flush()
        if ending in ("sigterm", "sigkill"):
            busy = _next_line(parent, lines)
            assert "busy" in busy, busy
            time.sleep(0.5)  # the worker is now deep in the power computation
            assert _alive([p for p in descendants if p.pid in busy["busy"]])  # type: ignore[operator]
            parent.send_signal(signal.SIGTERM if ending == "sigterm" else signal.SIGKILL)
        code = parent.wait(timeout=30)
        expected_code = {"exit": 0, "raise": 1, "sigterm": -signal.SIGTERM, "sigkill": -signal.SIGKILL}[ending]
        assert code == expected_code, parent.stderr.read() if parent.stderr else ""
        deadline = time.monotonic() + GONE_WITHIN_S
        while _alive(descendants) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [(p.pid, p.cmdline()) for p in _alive(descendants)]
        assert not left, f"still running {GONE_WITHIN_S} s after the parent ended ({ending}): {left}"
    finally:  # a failing case must not leave its own processes behind
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=10)
        for process in _alive(descendants):
            process.kill()


def test_worker_whose_parent_is_already_gone_exits_at_start() -> None:
    # PARENT_PID names a process that is not the worker's parent: as if the parent died before prctl was armed.
    read_fd, write_fd = os.pipe()
    try:
        worker = subprocess.run(
            [sys.executable, "-m", WORKER_MODULE, str(read_fd), str(write_fd), "1"],
            pass_fds=(read_fd, write_fd),
            env=dict(os.environ, PYTHONPATH=REPO_ROOT),
            timeout=30,
        )
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as reader:
        assert reader.read() == b""  # it never warmed up nor reported ready
    assert worker.returncode == 0


def test_watchdog_fires_only_when_the_parent_changes() -> None:
    orphaned, kept = threading.Event(), threading.Event()
    watch_parent(os.getpid(), poll_s=0.02, on_orphaned=orphaned.set)  # we are not our own parent
    watch_parent(os.getppid(), poll_s=0.05, on_orphaned=kept.set)  # keeps polling (daemon) while pytest runs
    assert orphaned.wait(timeout=5)
    time.sleep(0.3)
    assert not kept.is_set()


def test_workers_started_from_a_short_lived_thread_outlive_that_thread() -> None:
    # The parent-death signal follows the forking *thread*: workers must be forked by the pool's own thread.
    # The thread ends only once the workers are ready, i.e. have armed their parent-death signal.
    box: dict[str, VerifierPool] = {}

    def create() -> None:
        box["pool"] = VerifierPool(num_workers=2)
        box["pool"].wait_ready()

    thread = threading.Thread(target=create)
    thread.start()
    thread.join(timeout=60)
    pool = box["pool"]
    try:
        workers = [psutil.Process(pid) for pid in pool.worker_pids]
        time.sleep(0.5)
        assert len(_alive(workers)) == 2
        results = verify_batch(["\\boxed{4}", "\\boxed{5}"], ["4", "6"], pool=pool)
        assert [r.outcome for r in results] == ["correct", "incorrect"]
        assert pool.restarts == 0
    finally:
        pool.close()
