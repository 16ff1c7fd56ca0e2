"""Worker processes: forked where the platform forks, and never outliving the process that made them."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

__all__ = ["FORKS", "die_with_parent", "worker_pool"]


def die_with_parent(parent_pid: int) -> None:
    """In a worker process: be killed when the parent dies (Linux), and exit if it already has. SIGTERM
    and SIGINT (Ctrl-C reaches every process of the terminal's group) end it at once and quietly, the
    default actions, in place of the handlers the parent set (the batch itself stops in order); a
    signal the parent ignores (a batch started in the background) stays ignored."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


FORKS = "fork" in mp.get_all_start_methods() and sys.platform != "darwin"
"""Whether worker processes are forked: where the platform forks, whatever the default start method
(forkserver is Python 3.14's on Linux), but not on macOS, whose system libraries make fork unsafe."""


def worker_pool(n: int, initializer: Callable[..., None], initargs: tuple = ()) -> ProcessPoolExecutor:
    """``n`` worker processes, forked where FORKS (they inherit what this process has loaded), else the
    platform's default; ``initializer`` gets this process's pid first (for die_with_parent)."""
    return ProcessPoolExecutor(n, mp_context=mp.get_context("fork") if FORKS else None, initializer=initializer,
                               initargs=(os.getpid(), *initargs))
