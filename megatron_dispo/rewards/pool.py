"""A pool of verifier worker processes with a hard wall-clock deadline per answer, enforced by the parent.

Why processes started with ``python -m`` rather than ``multiprocessing``:
- ``fork`` copies a parent that, in training, holds torch/OpenMP threads and CUDA state: unsafe.
- ``spawn``/``forkserver`` re-import the parent's ``__main__`` (a training script importing torch) in each worker.
- A plain ``subprocess`` running `megatron_dispo.rewards._worker` imports only math-verify (about 1 s per worker
  including a warm-up parse, paid once: the pool is long-lived and shared), and talks over two pipes wrapped in
  `multiprocessing.connection.Connection` for framing.

Guarantees: an answer not verified within ``timeout_s`` of becoming the answer its worker works on gets verdict
``timeout``; that worker is killed (SIGKILL) and replaced, and the answers queued behind it are retried elsewhere. A
worker that dies mid-answer gives ``error`` for that answer and is replaced. Callers on any thread are served one
batch at a time (a lock), and no call waits longer than about ``(ceil(len(batch) / num_workers) + 1) * timeout_s``
plus worker start-up.

Lifetime: workers end with the process that owns the pool, however it ends. `close` (atexit for the shared pool)
stops them on a normal exit or an uncaught exception; on SIGTERM or SIGKILL of the parent each worker kills itself
(see `_worker`). The pool starts no ``multiprocessing`` machinery (no spawn children, no ``resource_tracker``):
``multiprocessing.connection`` is used only to frame messages on pipes.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import queue
import subprocess
import sys
import threading
import time
import zlib
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_WORKER_MODULE = "megatron_dispo.rewards._worker"
_MAX_CONSECUTIVE_START_FAILURES = 3
_PREFETCH = 2
"""Answers queued per worker: the next one is already there when the current one finishes (no round-trip wait)."""
WORKERS_ENV = "MEGATRON_DISPO_VERIFY_WORKERS"


@dataclass(eq=False)  # identity semantics: workers are found in lists by `is`
class _Worker:
    process: subprocess.Popen[bytes]
    to_worker: Connection
    from_worker: Connection
    spawned_at: float
    ready: bool = False
    inflight: deque[tuple[int, int]] = field(default_factory=deque)
    """(task id, batch index) sent to the worker, oldest first; the head is the answer being verified now."""
    deadline: float = float("inf")
    """Hard deadline of the head answer."""
    pid: int = field(init=False)

    def __post_init__(self) -> None:
        self.pid = self.process.pid


def _start_worker() -> _Worker:
    """Start one worker process with its two pipes (runs on the spawner thread, see `_Spawner`)."""
    child_read, parent_write = os.pipe()
    parent_read, child_write = os.pipe()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", _WORKER_MODULE, str(child_read), str(child_write), str(os.getpid())],
            pass_fds=(child_read, child_write),
            stdin=subprocess.DEVNULL,
            env=env,
        )
    except BaseException:
        os.close(parent_write)
        os.close(parent_read)
        raise
    finally:
        os.close(child_read)
        os.close(child_write)
    return _Worker(
        process=process,
        to_worker=Connection(parent_write, readable=False),
        from_worker=Connection(parent_read, writable=False),
        spawned_at=time.monotonic(),
    )


class _Spawner:
    """Starts every worker of this process from one daemon thread that lives as long as the process.

    Workers arm ``PR_SET_PDEATHSIG`` (see `_worker`), and Linux sends that signal when the *thread* that forked the
    worker ends, not the process. Forked from a caller's thread (a pool created, or a worker replaced, inside a
    `verify_batch` call on a short-lived thread), a healthy worker would be killed as soon as that thread returned.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._requests: queue.SimpleQueue[Future[_Worker]] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="verifier-spawner", daemon=True).start()

    def _serve(self) -> None:
        while True:
            future = self._requests.get()
            try:
                future.set_result(_start_worker())
            except BaseException as error:  # handed to the caller, which re-raises it
                future.set_exception(error)

    def start_worker(self) -> _Worker:
        """`_start_worker` on the spawner thread; blocks until the process is started."""
        future: Future[_Worker] = Future()
        self._requests.put(future)
        try:
            return future.result()
        except BaseException:
            # Interrupted while waiting (e.g. KeyboardInterrupt): nobody will own the worker, so stop it once started.
            future.add_done_callback(_kill_if_started)
            raise


def _kill_if_started(future: Future[_Worker]) -> None:
    if future.exception() is None:
        VerifierPool._kill(future.result())


_spawner_instance: _Spawner | None = None
_spawner_lock = threading.Lock()


def _spawner() -> _Spawner:
    """This process's spawner (a forked child gets its own: threads do not survive fork)."""
    global _spawner_instance
    with _spawner_lock:
        if _spawner_instance is None or _spawner_instance.pid != os.getpid():
            _spawner_instance = _Spawner()
        return _spawner_instance


class _GoldAffinityQueue:
    """Pending answers sharded by reference: answers sharing a gold go to the same worker slot, whose gold cache
    then parses that gold once instead of once per worker. An idle worker with an empty shard steals from the
    longest other shard, so the load stays balanced. The slot is a stable hash (crc32) of the gold, so repeated
    batches over the same problems also hit the same worker's cache.
    """

    def __init__(self, golds: list[str], num_slots: int) -> None:
        self._shards: list[deque[int]] = [deque() for _ in range(num_slots)]
        self._home: list[int] = []
        for index, gold in enumerate(golds):
            slot = zlib.crc32(gold.encode("utf-8", "surrogatepass")) % num_slots
            self._shards[slot].append(index)
            self._home.append(slot)

    def __bool__(self) -> bool:
        return any(self._shards)

    def pop_for(self, slot: int) -> int:
        if self._shards[slot]:
            return self._shards[slot].popleft()
        return max(self._shards, key=len).pop()  # steal from the tail: the owner works from the head

    def push_back(self, index: int) -> None:
        self._shards[self._home[index]].appendleft(index)


class VerifierPool:
    """Worker processes that run `megatron_dispo.rewards.equivalence.check_equivalence` under a hard deadline."""

    def __init__(self, num_workers: int = 2, *, start_timeout_s: float = 60.0) -> None:
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers={num_workers!r} must be a positive int; use 1-2 per free CPU core.")
        if start_timeout_s <= 0:
            raise ValueError(f"start_timeout_s={start_timeout_s} must be > 0 seconds.")
        self.num_workers = num_workers
        self.start_timeout_s = start_timeout_s
        self.restarts = 0
        """Workers replaced so far (timeouts, crashes); a health metric."""
        self._lock = threading.Lock()
        self._task_ids = itertools.count()
        self._owner_pid = os.getpid()
        self._closed = False
        self._start_failures = 0
        self._workers: list[_Worker] = [self._spawn() for _ in range(num_workers)]

    # ----------------------------------------------------------------------------------------------- lifecycle
    def _spawn(self) -> _Worker:
        return _spawner().start_worker()

    @staticmethod
    def _kill(worker: _Worker) -> None:
        for connection in (worker.to_worker, worker.from_worker):
            with contextlib.suppress(OSError):
                connection.close()
        if worker.process.poll() is None:
            worker.process.kill()
        # A process stuck in uninterruptible sleep ignores SIGKILL for a while: do not block the caller on it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.process.wait(timeout=5.0)

    def _replace(self, worker: _Worker) -> _Worker:
        self._kill(worker)
        self.restarts += 1
        replacement = self._spawn()
        self._workers[self._workers.index(worker)] = replacement
        return replacement

    def close(self) -> None:
        """Stop all workers (idempotent); registered with `atexit` for the shared pool."""
        if self._closed or os.getpid() != self._owner_pid:
            return
        self._closed = True
        for worker in self._workers:
            with contextlib.suppress(OSError):
                worker.to_worker.send(None)
        deadline = time.monotonic() + 2.0
        for worker in self._workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            self._kill(worker)

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (tests kill them to check replacement)."""
        return [worker.pid for worker in self._workers]

    @property
    def busy_worker_pids(self) -> list[int]:
        """Process ids of the workers currently verifying an answer."""
        return [worker.pid for worker in self._workers if worker.inflight]

    def wait_ready(self) -> None:
        """Block until every worker has imported math-verify (so timings exclude start-up)."""
        with self._lock:
            idle = _Batch([], len(self._workers), timeout_s=1.0)
            while not all(worker.ready for worker in self._workers):
                self._pump(idle)

    # ----------------------------------------------------------------------------------------------- batches
    def check(self, pairs: list[tuple[str, str]], timeout_s: float) -> list[tuple[str, str]]:
        """Verdicts for (gold, prediction) pairs: ("correct" | "incorrect" | "timeout" | "error", detail)."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0 seconds; the paper's runs use 5.")
        with self._lock:
            if self._closed:
                raise RuntimeError("VerifierPool is closed; create a new one (or use rewards.verify_batch).")
            if os.getpid() != self._owner_pid:
                raise RuntimeError("VerifierPool was created in another process (fork); create one per process.")
            batch = _Batch(pairs, len(self._workers), timeout_s)
            try:
                while batch.pending or batch.tasks:
                    self._dispatch(batch)
                    self._pump(batch)
            except BaseException:
                # Interrupted (e.g. KeyboardInterrupt): busy workers hold answers of this batch; drop them.
                for worker in list(self._workers):
                    if worker.inflight:
                        self._replace(worker)
                raise
            return [result if result is not None else ("error", "lost") for result in batch.results]

    def _dispatch(self, batch: _Batch) -> None:
        """Give every idle worker an answer, then queue up to `_PREFETCH` per worker so none waits for this process."""
        for depth in range(1, _PREFETCH + 1):
            for slot, worker in enumerate(list(self._workers)):
                if batch.pending and worker.ready and len(worker.inflight) < depth:
                    self._send_one(batch, slot, worker)

    def _send_one(self, batch: _Batch, slot: int, worker: _Worker) -> None:
        index = batch.pending.pop_for(slot)
        task_id = next(self._task_ids)
        gold, prediction = batch.pairs[index]
        try:
            worker.to_worker.send((task_id, gold, prediction, batch.timeout_s))
        except OSError:  # died: this answer never reached it, so it is retried elsewhere
            batch.pending.push_back(index)
            died_mid_answer = ("error", f"worker pid {worker.pid} died") if worker.inflight else None
            self._requeue_and_replace(worker, batch, head_verdict=died_mid_answer)
            return
        if not worker.inflight:
            worker.deadline = time.monotonic() + batch.timeout_s
        worker.inflight.append((task_id, index))
        batch.tasks[task_id] = index

    def _pump(self, batch: _Batch) -> None:
        """Wait for one event (a reply, a worker ready, a death, a deadline) and handle it."""
        now = time.monotonic()
        deadlines = [worker.deadline for worker in self._workers if worker.inflight]
        deadlines += [worker.spawned_at + self.start_timeout_s for worker in self._workers if not worker.ready]
        wait_s = max(0.0, min(deadlines) - now) if deadlines else None
        by_connection = {worker.from_worker: worker for worker in self._workers}
        for connection in wait(list(by_connection), timeout=wait_s):
            worker = by_connection[connection]
            if worker not in self._workers:  # replaced while handling an earlier event of this round
                continue
            try:
                message = connection.recv()
            except (EOFError, OSError):
                self._on_death(worker, batch)
                continue
            if message[0] == "ready":
                worker.ready = True
                self._start_failures = 0
                continue
            task_id, verdict, detail = message
            if not worker.inflight or worker.inflight[0][0] != task_id:
                self._requeue_and_replace(worker, batch, head_verdict=("error", f"protocol error: reply {task_id}"))
                continue
            worker.inflight.popleft()
            # The next queued answer started when this reply was sent; its budget starts now (a few ms later).
            worker.deadline = time.monotonic() + batch.timeout_s if worker.inflight else float("inf")
            if task_id in batch.tasks:
                batch.results[batch.tasks.pop(task_id)] = (verdict, detail)
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.inflight and now >= worker.deadline:
                detail = f"no verdict within timeout_s={batch.timeout_s}; worker pid {worker.pid} killed and replaced"
                self._requeue_and_replace(worker, batch, head_verdict=("timeout", detail))
            elif not worker.ready and now >= worker.spawned_at + self.start_timeout_s:
                self._on_start_failure(worker, f"not ready after start_timeout_s={self.start_timeout_s}")

    def _requeue_and_replace(self, worker: _Worker, batch: _Batch, head_verdict: tuple[str, str] | None) -> None:
        """Replace `worker`; its head answer gets `head_verdict` (None: retry it), queued ones are retried."""
        for position, (task_id, index) in enumerate(worker.inflight):
            batch.tasks.pop(task_id, None)
            if position == 0 and head_verdict is not None:
                batch.results[index] = head_verdict
            else:
                batch.pending.push_back(index)
        worker.inflight.clear()
        self._replace(worker)

    def _on_death(self, worker: _Worker, batch: _Batch) -> None:
        if not worker.ready:
            self._on_start_failure(worker, f"exited during start-up with code {worker.process.poll()}")
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.process.wait(timeout=1.0)
        code = worker.process.poll()
        self._requeue_and_replace(
            worker, batch, head_verdict=("error", f"worker pid {worker.pid} died (exit code {code})")
        )

    def _on_start_failure(self, worker: _Worker, reason: str) -> None:
        self._start_failures += 1
        if self._start_failures > _MAX_CONSECUTIVE_START_FAILURES:
            self._kill(worker)
            self._workers.remove(worker)
            if not self._workers:
                self._closed = True
            raise RuntimeError(
                f"verifier worker failed to start {self._start_failures} times in a row ({reason}). "
                f"Check that `{sys.executable} -m {_WORKER_MODULE}` can import math_verify (see its stderr above)."
            )
        self._replace(worker)


class _Batch:
    """Book-keeping of one `VerifierPool.check` call."""

    def __init__(self, pairs: list[tuple[str, str]], num_slots: int, timeout_s: float) -> None:
        self.pairs = pairs
        self.timeout_s = timeout_s
        self.results: list[tuple[str, str] | None] = [None] * len(pairs)
        self.pending = _GoldAffinityQueue([gold for gold, _ in pairs], num_slots)
        self.tasks: dict[int, int] = {}  # task id in flight -> index in this batch


_default_pool: VerifierPool | None = None
_default_pool_lock = threading.Lock()


def default_num_workers() -> int:
    """Workers for the shared pool: ``$MEGATRON_DISPO_VERIFY_WORKERS`` or half the cores, between 2 and 8."""
    configured = os.environ.get(WORKERS_ENV)
    if configured is not None:
        if not configured.isdigit() or int(configured) < 1:
            raise ValueError(f"{WORKERS_ENV}={configured!r} must be a positive integer, e.g. 2.")
        return int(configured)
    return max(2, min(8, (os.cpu_count() or 2) // 2))


def get_default_pool() -> VerifierPool:
    """The process-wide pool used by `verify_batch`, created on first use and closed at interpreter exit."""
    global _default_pool
    with _default_pool_lock:
        if _default_pool is None or _default_pool._closed or _default_pool._owner_pid != os.getpid():
            _default_pool = VerifierPool(default_num_workers())
            atexit.register(_default_pool.close)
        return _default_pool
