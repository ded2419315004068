"""The bounded process pool the converters and the packed-format writers share.

`bounded_imap` maps a function over tasks in worker processes with a bounded number of tasks in
flight, in order; `default_workers` is the worker count for "all cores"; `progress` is the bar
every pass over the images draws. It sits below fasttrain.format and fasttrain.converters and
imports neither.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, Optional

from tqdm import tqdm


class WorkerDied(RuntimeError):
    """A worker process of the pool died (the OOM killer, a crash inside a native decoder)."""


def worker_init() -> None:
    import cv2
    cv2.setNumThreads(1)  # one image per process: threads inside cv2 only oversubscribe


def bounded_imap(fn: Callable, tasks: Iterable, workers: int, window: Optional[int] = None,
                 initializer: Optional[Callable] = worker_init) -> Iterator:
    """Ordered `map(fn, tasks)` over a process pool with at most `window` tasks in flight.

    `Pool.imap` / `Executor.map` queue every result the workers produce even when the consumer
    is slower; the window bounds memory whatever the dataset size. workers <= 1 runs in this process (tests,
    tiny sets: no fork cost). fork, not spawn: workers start in milliseconds and inherit the
    memmaps; they only run numpy / PIL / cv2 / simplejpeg, no threads of the parent.
    """
    if workers <= 1:
        for t in tasks:
            yield fn(t)
        return
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    window = window or 4 * workers
    # cv2's thread pool is not fork-safe: once this process ran a large cv2 op (a converter with
    # workers=0, a test), a forked worker's first parallel cv2 call waits forever on threads that
    # did not fork (measured: a hang, reproduced in tests/converters/test_decode.py). One cv2 thread here
    # while the pool lives tears that pool down before forking; the setting is restored after.
    import cv2
    cv2_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield from _windowed(fn, tasks, workers, window, ctx, initializer)
    finally:
        cv2.setNumThreads(cv2_threads)


def _windowed(fn: Callable, tasks: Iterable, workers: int, window: int, ctx, initializer) -> Iterator:
    # ProcessPoolExecutor, not multiprocessing.Pool: when a worker dies (OOM killer, segfault in a
    # decoder) Pool waits forever for the lost task; the executor raises BrokenProcessPool.
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer) as pool:
        pending = []
        it = iter(tasks)
        for t in it:
            pending.append(pool.submit(fn, t))
            if len(pending) >= window:
                break
        try:
            while pending:
                res = pending.pop(0).result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(fn, nxt))
                yield res
        except BrokenProcessPool as e:
            raise WorkerDied(f"a worker process died ({e}); out of memory? retry with fewer --workers") from e
        finally:
            for f in pending:
                f.cancel()


def default_workers(workers: Optional[int]) -> int:
    """`workers` as given (0 and 1: in this process), or every core this process may run on."""
    if workers is not None:
        return max(0, int(workers))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def progress(total: int, desc: str, enabled: bool) -> tqdm:
    """The images-per-second bar on stderr (a no-op when not `enabled`: --no-progress, CI logs)."""
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True,
                smoothing=0.1, file=sys.stderr)
