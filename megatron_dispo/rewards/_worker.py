"""Entry point of one verifier worker process (started by `megatron_dispo.rewards.pool.VerifierPool`).

Run as ``python -m megatron_dispo.rewards._worker READ_FD WRITE_FD PARENT_PID``: a fresh interpreter that imports
only math-verify and this package's rewards modules (never the parent's ``__main__``, torch or CUDA state). It answers
``(task_id, gold, prediction, timeout_s)`` messages with ``(task_id, verdict, detail)`` until its inbox closes.
The worker runs math-verify on its main thread, so math-verify's ``signal.alarm`` timeouts work here; the parent
still enforces the hard deadline by killing the process.

A worker never outlives its parent, however the parent ends. A normal exit closes the pool (atexit); SIGTERM and
SIGKILL run no parent code, and the inbox may not even reach EOF (a child the parent forked keeps the pipe open), so
the worker watches for itself: on Linux the kernel sends it SIGKILL when the parent dies (``PR_SET_PDEATHSIG``, the
only thing that stops it inside a long C call such as a huge integer power, which holds the GIL); everywhere a daemon
thread sees ``os.getppid()`` change and exits.
"""

from __future__ import annotations

import os
import signal
import sys
from multiprocessing.connection import Connection

from megatron_dispo.lifetime import set_parent_death_signal, watch_parent


def serve(inbox: Connection, outbox: Connection) -> int:
    """Answer verification requests until the parent closes the pipe or sends None."""
    from megatron_dispo.rewards.equivalence import GoldCache, check_equivalence

    # Warm up before declaring readiness: the first parse builds math-verify's LaTeX parser and regexes (about 0.3 s
    # of CPU), which would otherwise count against the first answer's hard deadline.
    check_equivalence("\\frac{1}{2}", "0.5", timeout_s=5.0, gold_cache=GoldCache())
    gold_cache = GoldCache()
    outbox.send(("ready", os.getpid()))
    while True:
        try:
            message = inbox.recv()
        except (EOFError, OSError):
            return 0
        if message is None:
            return 0
        task_id, gold, prediction, timeout_s = message
        try:
            reply = (task_id, check_equivalence(gold, prediction, timeout_s=timeout_s, gold_cache=gold_cache), "")
        except Exception as error:  # report, never die silently: the parent turns this into outcome "error"
            reply = (task_id, "error", f"{type(error).__name__}: {error}"[:500])
        try:
            outbox.send(reply)
        except OSError:  # the parent is gone (or gave up on this answer): nothing left to do
            return 0


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        raise SystemExit("usage: python -m megatron_dispo.rewards._worker READ_FD WRITE_FD PARENT_PID")
    # Ctrl-C goes to the whole process group; the parent decides what happens to its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent_pid = int(argv[2])
    set_parent_death_signal()
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed: nobody will send it
        return 0
    watch_parent(parent_pid)
    inbox = Connection(int(argv[0]), writable=False)
    outbox = Connection(int(argv[1]), readable=False)
    return serve(inbox, outbox)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
