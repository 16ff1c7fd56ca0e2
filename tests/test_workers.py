"""Ctrl-C and SIGTERM while this process waits on worker processes: held until a wait can raise them safely."""
from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np
import pytest

from her2score.workers import die_with_parent, pause, result_of, signals_held, wait_first, worker_pool

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")


@pytest.fixture(autouse=True)
def python_handlers():
    """Python's own Ctrl-C handler (KeyboardInterrupt) whatever this test process was started with (a batch
    job or a background shell ignores SIGINT); every handler as it was afterwards."""
    earlier = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for s, handler in earlier.items():
        signal.signal(s, handler)


def _nap(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_ctrl_c_inside_the_pools_own_calls_waits_for_a_wait():
    """A Ctrl-C that lands while this process submits work (or anywhere but a wait) is not raised there, where
    concurrent.futures may hold a future's lock, but by the next wait; the pool still shuts down, and after it
    the handler is Python's own again."""
    with pytest.raises(KeyboardInterrupt):
        with worker_pool(2, die_with_parent) as pool:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # a handler that raises would have raised by now
            passed_the_signal = True
            futures = [pool.submit(_nap, 1.0)]
            wait_first(futures)
    assert passed_the_signal
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_held_is_raised_on_leaving_and_waits_return_results():
    """Work done in the pool comes back as before; a signal held when the block ends is raised as it ends."""
    with pytest.raises(KeyboardInterrupt):
        with worker_pool(2, die_with_parent) as pool:
            futures = [pool.submit(_nap, 0.01) for _ in range(4)]
            pids = {result_of(f) for f in futures}
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_sigterm_handler_runs_at_the_wait():
    """The cli's SIGTERM handler (SystemExit) is held the same way; an ignored signal stays ignored."""
    signal.signal(signal.SIGTERM, lambda s, f: (_ for _ in ()).throw(SystemExit(128 + s)))
    with pytest.raises(SystemExit) as e:
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            with worker_pool(1, die_with_parent) as pool:
                wait_first([pool.submit(_nap, 1.0)])
    assert e.value.code == 128 + signal.SIGTERM
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with signals_held():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def _handler_in_worker(_: int) -> str:
    return repr(signal.getsignal(signal.SIGINT))


def test_workers_forked_while_signals_are_held_die_on_ctrl_c():
    """A worker forked inside the block takes the default action, not the held handler it was forked with."""
    with worker_pool(1, die_with_parent) as pool:
        assert result_of(pool.submit(_handler_in_worker, 0)) == repr(signal.SIG_DFL)


def test_a_poll_without_futures_raises_the_signal_held():
    """pause (the Dask batch's poll) raises a Ctrl-C held since the last poll, and nothing when none came."""
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            pause()
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            reached = True
            pause()
    assert reached


def _opencv_threads(_) -> int:
    import cv2

    return cv2.getNumThreads()


def test_a_fork_leaves_opencv_one_thread_in_the_child_and_its_own_in_the_parent():
    """A tile worker hung for ever in OpenCV (in pthread_cond_destroy, remaking its thread pool) in a benchmark run:
    the pool's threads, waiting for work when the slide's process forked, were not in the child. So every fork of a
    process that has imported her2score stops OpenCV's pool first (workers.register_at_fork): the child has one
    thread and no pool, worker_pool's and any other fork's (a caller's own multiprocessing) alike; the parent gets
    its count back."""
    import cv2

    before = cv2.getNumThreads()
    cv2.setNumThreads(3)  # not the machine's default, which may be 1
    try:
        cv2.GaussianBlur(np.zeros((2000, 2000), np.float32), (0, 0), 5)  # the pool's threads at work, then waiting
        with worker_pool(2, die_with_parent) as pool:
            in_workers = {result_of(f) for f in [pool.submit(_opencv_threads, i) for i in range(4)]}
            in_parent = cv2.getNumThreads()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # a bare fork, outside worker_pool
            os.write(write, bytes([cv2.getNumThreads()]))
            os._exit(0)
        os.waitpid(pid, 0)
        in_child = os.read(read, 1)[0]
        os.close(read)
        os.close(write)
        assert (in_workers, in_child, in_parent, cv2.getNumThreads()) == ({1}, 1, 3, 3)
    finally:
        cv2.setNumThreads(before)
