"""A single daemon thread that runs blocking work, in order, off the event loop: a sink's writes,
the spool's database.

Unlike a ThreadPoolExecutor, its thread is a daemon thread that nobody joins: a write stuck on a
pipe nobody reads, or on a hung disk, cannot keep the process from exiting once shutdown gave up
on it (the pipeline bounds shutdown by ``shutdown.timeout``).

It sits below the sinks and the stores that use it, and imports nothing of the package.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["WriterThread"]

T = TypeVar("T")
_STOP = object()


class WriterThread:
    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self.closed = False

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            loop, fut, fn, args = job
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 (whatever fn raises is its caller's)
                loop.call_soon_threadsafe(_set_exception, fut, exc)
            else:
                loop.call_soon_threadsafe(_set_result, fut, result)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the thread and await its result (or exception)."""
        if self.closed:
            raise RuntimeError("writer thread closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, fut, fn, args))
        return await fut

    def close(self) -> None:
        """Let the thread finish the queued jobs and end; never waits for it."""
        if not self.closed:
            self.closed = True
            self._jobs.put(_STOP)


def _set_result(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.done():
        fut.set_result(result)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
