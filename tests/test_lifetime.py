"""`megatron_dispo.lifetime.die_with_parent`: spawned children (the tests' rank launcher, the multi-rank conversion)
end when their parent is SIGKILLed, taking multiprocessing's resource tracker with them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]

PARENT = """
import multiprocessing as mp, os, sys, time

def child(parent_pid):
    from megatron_dispo.lifetime import die_with_parent
    die_with_parent(parent_pid)
    time.sleep(600)

if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()  # a spawn Queue starts the resource tracker, as the rank launcher's does
    procs = [ctx.Process(target=child, args=(os.getpid(),)) for _ in range(2)]
    for proc in procs:
        proc.start()
    print(" ".join(str(proc.pid) for proc in procs), flush=True)
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_spawned_children_and_resource_tracker_end_when_the_parent_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert parent.stdout is not None
        children = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(children) == 2 and all(_alive(pid) for pid in children)
        time.sleep(1.0)  # the children have armed their guards (import + prctl) well within this
        family = [p.pid for p in psutil.Process(parent.pid).children(recursive=True)]
        assert set(children) < set(family)  # the resource tracker is the other one
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in family) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in family if _alive(pid)], "a child outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
