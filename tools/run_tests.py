"""The test suite as two pytest processes side by side (``make test``), each streaming its lines with a prefix.

Run one after the other, the suite leaves a core idle about a third of its time on a 2-core machine: imports, one-rank
training runs (``OMP_NUM_THREADS=1``), ranks waiting on each other. Two shards fill it. The split is by folder, so the
session fixtures that are costly to build (the warmed-up model and the reference runs of ``tests/trainer``; the local
Slurm cluster of ``tests/launch``, which holds the machine's one munge socket) are built once, in one shard. Shard
times are printed at the end; the exit status is non-zero when any shard fails.

    python tools/run_tests.py [pytest args ...]     # the args go to every shard (e.g. -k, -x, --durations=20)
    python tools/run_tests.py tests/algorithms      # given test paths: one plain pytest run of them
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shard:
    name: str
    paths: tuple[str, ...]


SHARDS = (
    Shard("trainer", ("tests/trainer",)),
    Shard("rest", ("tests", "--ignore=tests/trainer")),
)
"""About 630 s and 680 s of one-process test time each on 2 cores (``docs/performance.md``, test suite)."""


def _stream(shard: Shard, process: subprocess.Popen[str], last_line: list[str]) -> None:
    """Print the shard's lines as they come; keep its last one (pytest's summary) in ``last_line``."""
    assert process.stdout is not None
    for line in process.stdout:
        print(f"[{shard.name}] {line}", end="", flush=True)
        last_line[:] = [line.rstrip()]


def main(argv: list[str]) -> int:
    if any(not arg.startswith("-") and (REPO_ROOT / arg.split("::")[0]).exists() for arg in argv):
        return subprocess.call([sys.executable, "-m", "pytest", *argv], cwd=REPO_ROOT)
    started = time.perf_counter()
    running = []
    for shard in SHARDS:
        command = [sys.executable, "-m", "pytest", *shard.paths, "--durations=10", *argv]
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        last_line: list[str] = []
        reader = threading.Thread(target=_stream, args=(shard, process, last_line), daemon=True)
        reader.start()
        running.append((shard, process, reader, last_line))
    results = []
    for shard, process, reader, last_line in running:
        returncode = process.wait()
        reader.join()
        results.append((shard, returncode, time.perf_counter() - started, last_line[0] if last_line else ""))
    print("\nshard     rc  finished after  summary")
    for shard, returncode, seconds, summary in results:
        print(f"{shard.name:<8} {returncode:>3}  {seconds:>12.1f} s  {summary}")
    print(f"suite: {time.perf_counter() - started:.1f} s wall", flush=True)
    # pytest exits 5 when a shard selects no test (e.g. -k matching only the other shard's tests): not a failure
    return max((rc for _, rc, _, _ in results if rc != 5), default=5)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
