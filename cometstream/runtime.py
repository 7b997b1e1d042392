"""Process-wide interpreter settings of the daemon: one owner, applied once at start-up.

Only the commands that run the daemon (``run``, and ``demo``, which runs it against the
simulator) call :func:`tune_for_daemon`, before the event loop starts; the short-lived commands
(``check``, ``backfill``, ``dlq``, ``tap``, ``simulate``) keep CPython's defaults. Nothing else in
the package changes these settings, except :func:`gc_paused`, which turns the collector off
for a stretch of synchronous work and back to what it was before anything else runs. The
figures behind the values are measured by ``benchmarks/throughput.py`` and recorded in
``docs/performance.md`` ("Interpreter settings").
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Iterator
from typing import Final

__all__ = ["GC_THRESHOLDS", "SWITCH_INTERVAL", "gc_paused", "tune_for_daemon", "tune_gc",
           "tune_switch_interval"]

#: the cyclic collector's thresholds (generation 0 allocations, then collections of 0 and of 1)
GC_THRESHOLDS: Final = (50_000, 20, 100)
#: seconds a thread may hold the GIL while another waits for it (CPython's default: 0.005)
SWITCH_INTERVAL: Final = 0.0005


def tune_gc() -> None:
    """Collect cycles rarely, and never scan what start-up created.

    Every event allocates a few dicts and queued events keep many alive; with the default
    thresholds the collector runs every few hundred allocations and its older generations walk
    every live event, for objects that reference counting frees anyway (events hold no cycles).
    ``gc.freeze()`` moves the modules, the config and the pipeline out of the collector's sight.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def tune_switch_interval() -> None:
    """Hand the GIL to a waiting thread sooner.

    A sink's writer thread (file writes, the ledger's SQLite commits) that finished its work
    waits for the GIL until the busy event loop gives it up; meanwhile the loop reads on and the
    sink's queue, and the process's memory, grow in a burst. A shorter interval keeps the queue
    short at the same throughput.
    """
    sys.setswitchinterval(SWITCH_INTERVAL)


def tune_for_daemon() -> None:
    """Both settings, for a process that handles a hundred thousand small objects a second with
    a writer thread or two beside the event loop. Call once, before the event loop starts."""
    tune_gc()
    tune_switch_interval()


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic collector off for a stretch of synchronous work that creates many objects
    which live on a while and hold no cycles (a parsed API answer, a resync span's plans and
    events): left on, the collector would walk them again and again while they are built.

    For synchronous code only: never ``await`` inside the block, so the event loop's other
    tasks never run with the collector off, and the state found is the state restored (nested
    blocks too, on any exception)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
