"""The rule for background tasks: none dies silently.

A task the daemon starts and does not await at once (a sync, the fleet's reads, a sink's
worker, the ledger's commit loop) hands its end to :func:`supervise`. A task that returns, or
is cancelled, ends quietly. One that raises died of a bug (expected failures are handled inside
the task, where it retries or reports them); then, once:

1. it is logged, with its traceback (``background task died``, field ``task``);
2. ``on_death`` gets a :class:`~cometstream.errors.TaskDied` naming the task (its ``__cause__``
   is the error) and does the rest of the rule: record it where the daemon shows its health
   (``/readyz`` and the metrics it already keeps for that part), and release whatever waits on
   the task with that error (a future failed, held events let go, a "busy" flag cleared), so
   nothing hangs on a task that is gone.

An ``on_death`` that fails itself is logged too; it never reaches the event loop's exception
handler, which would print it without context.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import structlog

from .errors import TaskDied

__all__ = ["supervise"]

log = structlog.get_logger("cometstream.tasks")

_T = TypeVar("_T", bound="asyncio.Future[Any]")


def supervise(task: _T, name: str, on_death: Callable[[TaskDied], None] | None = None) -> _T:
    """Apply the rule to ``task`` (named ``name`` in the log and in ``TaskDied``); returns it."""

    def ended(t: asyncio.Future[Any]) -> None:
        if t.cancelled():
            return
        exc = t.exception()
        if exc is None:
            return
        log.error("background task died", task=name, error=f"{exc.__class__.__name__}: {exc}",
                  exc_info=exc)
        if on_death is None:
            return
        died = TaskDied(name, exc)
        died.__cause__ = exc
        try:
            on_death(died)
        except Exception:  # the rule's own failure: said, never lost
            log.exception("background task death not handled", task=name)

    task.add_done_callback(ended)
    return task
