"""Worker processes: forked where the platform forks, never outliving the process that made them, and
waited on so that Ctrl-C cannot hang the process that made them."""
from __future__ import annotations

import multiprocessing as mp
import numbers
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager

__all__ = ["FORKS", "checked_workers", "die_with_parent", "pause", "result_of", "signals_held", "wait_first", "worker_pool"]

POLL_S = 0.1
"""While signals are held (signals_held), how often (s) a wait looks for one."""


def checked_workers(n) -> int:
    """``n`` as a count of worker processes: a whole number (numpy's included, not a bool) of at least 1."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"workers must be a whole number of processes, at least 1, got {n!r}")
    return int(n)


_held: list[tuple[int, object]] = []  # the signals caught while held: (signum, frame)
_handlers: dict[int, Callable] = {}  # the Python handlers replaced while held, by signal
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
"""The signals that stop a batch in order (Ctrl-C, kill, a closed terminal), and a worker at once."""


@contextmanager
def signals_held() -> Iterator[None]:
    """Within (on the main thread), a SIGINT, SIGTERM or SIGHUP whose handler is Python's (KeyboardInterrupt, or
    the cli's SystemExit) is held, and raised by the next wait_first, result_of or pause, not at whatever bytecode it
    lands on: raised inside concurrent.futures' own locking, it leaves a future's lock held, and the pool's
    thread then blocks the process's exit for ever. On leaving, a signal still held is raised, in place of
    any error leaving with it. Nests (the outermost block holds); elsewhere it changes nothing."""
    if _handlers or threading.current_thread() is not threading.main_thread():
        yield
        return
    for signum in STOP_SIGNALS:
        handler = signal.getsignal(signum)
        if callable(handler):
            _handlers[signum] = handler
            signal.signal(signum, lambda *caught: _held.append(caught))
    try:
        yield
    except BaseException:
        _release()  # a signal held is raised in place of the error (its Ctrl-C may have caused it: the workers died)
        _raise_held()
        raise
    _release()
    _raise_held()


def _release() -> None:
    for signum, handler in _handlers.items():
        signal.signal(signum, handler)
    _handlers.clear()


def _raise_held() -> None:
    """Run the handler of the first signal held (which raises), forgetting the others."""
    if _held:
        signum, frame = _held[0]
        _held.clear()
        (_handlers.get(signum) or signal.getsignal(signum))(signum, frame)


def wait_first(fs: Iterable[Future]) -> set[Future]:
    """The futures of ``fs`` that are done, once one is. A signal held (signals_held) is raised here, where
    no lock is held, within POLL_S; before the futures are returned, as they may have failed because the
    same Ctrl-C killed their workers."""
    fs = set(fs)
    while True:
        done, _ = wait(fs, timeout=POLL_S if _handlers else None, return_when=FIRST_COMPLETED)
        _raise_held()
        if done:
            return done


def pause(seconds: float = POLL_S) -> None:
    """Sleep ``seconds``, then raise a signal held (signals_held): the poll of work that wait_first cannot wait on."""
    if seconds > 0:
        time.sleep(seconds)
    _raise_held()


def result_of(future: Future):
    """``future.result()``, with Ctrl-C, SIGTERM and SIGHUP held until it can be raised safely (wait_first)."""
    with signals_held():
        wait_first([future])
    return future.result()


def die_with_parent(parent_pid: int) -> None:
    """In a worker process: be killed when the parent dies (Linux), and exit if it already has. SIGTERM,
    SIGINT and SIGHUP (Ctrl-C and a closed terminal reach every process of its group) end it at once and quietly, the
    default actions, in place of the handlers the parent set (the batch itself stops in order); a
    signal the parent ignores (a batch started in the background) stays ignored."""
    _handlers.clear()  # the parent's, where it held signals when it forked this process
    _held.clear()
    for signum in STOP_SIGNALS:
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


_opencv_threads: list[int] = []  # OpenCV's thread count before a fork, restored in the parent after it


def _before_fork() -> None:
    """Stop OpenCV's thread pool (one thread) in a process about to fork, where OpenCV is loaded: a pool thread
    waiting for work is not in the child, whose OpenCV may then wait for it for ever (a tile worker of a
    benchmark run hung so, in pthread_cond_destroy). The child keeps one thread: worker processes are the
    parallelism, and OpenCV's threads beside them would oversubscribe the cores."""
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:
        _opencv_threads.append(cv2.getNumThreads())
        cv2.setNumThreads(1)


def _after_fork_in_parent() -> None:
    cv2 = sys.modules.get("cv2")
    if cv2 is not None and _opencv_threads:
        cv2.setNumThreads(_opencv_threads.pop())


if hasattr(os, "register_at_fork"):  # every fork of a process that has imported her2score, the caller's own included
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_opencv_threads.clear)


@contextmanager
def worker_pool(n: int, initializer: Callable[..., None], initargs: tuple = (), *,
                stop_on_error: bool = False) -> Iterator[ProcessPoolExecutor]:
    """``n`` worker processes, forked where FORKS (they inherit what this process has loaded), else the
    platform's default; ``initializer`` gets this process's pid first (for die_with_parent). Within,
    signals are held (signals_held): wait on the pool's futures with wait_first or result_of. On leaving,
    the pool shuts down, waiting for its tasks; after an error, those not started are cancelled, and the
    running ones are waited for, or with ``stop_on_error`` stopped at once (their processes terminated)."""
    with signals_held():
        pool = ProcessPoolExecutor(n, mp_context=mp.get_context("fork") if FORKS else None, initializer=initializer,
                                   initargs=(os.getpid(), *initargs))
        try:
            yield pool
        except BaseException:
            if stop_on_error:  # ProcessPoolExecutor.terminate_workers is Python 3.14's
                for process in list((pool._processes or {}).values()):
                    process.terminate()
            pool.shutdown(wait=not stop_on_error, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
