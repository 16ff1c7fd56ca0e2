"""Worker processes: forked where the platform forks, and never outliving the process that made them."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

__all__ = ["die_with_parent", "worker_pool"]


def die_with_parent(parent_pid: int | None = None) -> None:
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
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def worker_pool(n: int, initializer: Callable[..., None], initargs: tuple = ()) -> ProcessPoolExecutor:
    """``n`` worker processes forked from this one where the platform forks (they inherit what it has
    loaded), else spawned; ``initializer`` gets this process's pid first (for die_with_parent: a
    forked worker's parent is this process, a forkserver's is not), None where they are not forked."""
    fork = "fork" in mp.get_all_start_methods()
    return ProcessPoolExecutor(n, mp_context=mp.get_context("fork") if fork else None, initializer=initializer,
                               initargs=(os.getpid() if fork else None, *initargs))
