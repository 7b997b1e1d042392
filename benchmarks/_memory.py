"""Resident memory for the benchmarks that measure a daemon in their own process."""

from __future__ import annotations

import asyncio
import os


def rss_mb() -> float:
    """This process's resident set, in MB (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRss:
    """The highest resident set seen, sampled every 20 ms while :meth:`start`'s task runs."""

    def __init__(self) -> None:
        self.before = self.peak = rss_mb()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mb())
            await asyncio.sleep(0.02)
