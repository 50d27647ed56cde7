"""Child processes that never outlive their parent, however the parent ends (exit, exception, SIGTERM, SIGKILL).

SIGKILL runs no parent code, so the child watches for itself: on Linux the kernel sends it SIGKILL when the parent
dies (``PR_SET_PDEATHSIG``: the only thing that stops it inside a long C call that holds the GIL); everywhere a daemon
thread sees ``os.getppid()`` change and exits. A leaf module (imports nothing from the package), used by the verifier
workers, the multi-rank conversion launcher and the tests' process launcher.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_POLL_S = 0.5
"""How often the watchdog thread checks that the parent is alive (a backstop to PR_SET_PDEATHSIG)."""


def set_parent_death_signal() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies; False where prctl is unavailable (not Linux).

    The kernel ties this to the parent *thread* that forked us, so the pool forks workers from one thread that lives
    as long as its process (`pool._Spawner`).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watch_parent(
    parent_pid: int, *, poll_s: float = PARENT_POLL_S, on_orphaned: Callable[[], object] | None = None
) -> threading.Thread:
    """Start a daemon thread that calls `on_orphaned` (default: exit now) once `parent_pid` is no longer our parent.

    An orphan is re-parented (to init or a subreaper), so a changed ``os.getppid()`` means the parent is gone; a
    recycled pid cannot fool it.
    """

    def exit_now() -> None:
        os._exit(0)  # no cleanup to do, and the main thread may be stuck in math-verify

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        (on_orphaned or exit_now)()

    thread = threading.Thread(target=watch, name="parent-watchdog", daemon=True)
    thread.start()
    return thread


def die_with_parent(parent_pid: int) -> None:
    """Both guards at once, for a child started by ``parent_pid``; exits at once if that parent is already gone."""
    set_parent_death_signal()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(0)
    watch_parent(parent_pid)
