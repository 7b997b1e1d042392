"""The one retry policy: for a failed send, retry it, pause the sink, or dead-letter its events.

:meth:`RetryPolicy.decide` is the only place that reads a failure (a
:class:`~cometstream.errors.SinkError`'s ``retryable``, ``accepted``, ``failed``,
``retry_after``, ``sink_wide``, or any other exception) and turns it into a :class:`Verdict`;
the delivery engine (``engine.py``) only carries it out. What counts toward ``max_retries``:

- never a failure about the sink itself (``sink_wide``: unreachable, refused credentials);
- with one send at a time (``concurrency`` 1), every other failure;
- with several in flight, a failure only if another send was accepted since this one's previous
  failure: a receiver that is down, or refuses every send, dead-letters nothing.

Past ``max_retries`` counted failures, the send's events are refused for good. A
``retry_after`` pauses every send of the sink (not only this one) until then. With one send at
a time, the events a failure says were ``accepted`` are acknowledged and only the rest is sent
again, and a refusal for good concerns only the ``failed`` events after them.

:func:`report_failure` says so in the log: one warning when a failure starts or changes, then a
reminder a minute (with several sends in flight, at most one warning every ``WARN_GAP``).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Final, NamedTuple

import structlog

from ..errors import SinkError

if TYPE_CHECKING:
    from ..backoff import Backoff
    from .route import Route

__all__ = ["FAILING_REMINDER", "WARN_GAP", "RetryPolicy", "Verdict", "cancelled_by_us",
           "describe", "recovered", "report_failure"]

FAILING_REMINDER: Final = 60.0
#: with several sends in flight, at most one failure warning this often (seconds)
WARN_GAP: Final = 10.0
log = structlog.get_logger("cometstream.pipeline")


class Verdict(NamedTuple):
    """What to do about a failed send of ``size`` events, in this order: pause every send of
    the sink for ``pause`` seconds (0: no pause); acknowledge the first ``accepted``; refuse
    the next ``refused`` for good (dead-letter them, ``why``); then, if ``retry``, send the
    rest again after the backoff, else go on with the rest at once."""

    accepted: int
    refused: int
    why: str
    retry: bool
    pause: float = 0.0
    unexpected: bool = False


class RetryPolicy:
    """The retries of one send: holds its backoff and what counted toward ``max_retries``."""

    __slots__ = ("_seen", "backoff", "counted", "retries", "route")

    def __init__(self, route: Route, backoff: Backoff) -> None:
        self.route = route
        self.backoff = backoff
        #: failures counted toward ``max_retries`` since the last progress
        self.counted = 0
        #: retries so far
        self.retries = 0
        self._seen = route.accepted_sends

    def decide(self, exc: BaseException, size: int) -> Verdict:
        """The one decision for a failed send of ``size`` events: retry, pause, dead-letter."""
        serial = self.route.concurrency == 1
        if isinstance(exc, SinkError):
            # (with several sends in flight each succeeds or fails whole: the counts are not read)
            accepted = min(max(exc.accepted, 0), size) if serial else 0
            if accepted:
                self.counted = 0
                self.backoff.reset()  # the sink works: the next failure starts small again
                if accepted == size:
                    return Verdict(accepted, 0, "", retry=False)
            rest = size - accepted
            part = min(exc.failed, rest) if serial and exc.failed > 0 else rest
            if not exc.retryable:
                self.counted = 0
                return Verdict(accepted, part, str(exc), retry=False)
            pause = exc.retry_after or 0.0  # (the receiver asked: even if these give up)
            if self._counts(sink_wide=exc.sink_wide) and self._exhausted():
                self.counted = 0
                return Verdict(accepted, part, self._gave_up(exc), retry=False, pause=pause)
            self.retries += 1
            return Verdict(accepted, 0, "", retry=True, pause=pause)
        # anything else a sink lets out (even a CancelledError of its own): retried the same way
        if self._counts(sink_wide=False) and self._exhausted():
            self.counted = 0
            return Verdict(0, size, self._gave_up(exc), retry=False, unexpected=True)
        self.retries += 1
        return Verdict(0, 0, "", retry=True, unexpected=True)

    def _counts(self, *, sink_wide: bool) -> bool:
        route = self.route
        if sink_wide:  # (not about this send: never counted)
            self._seen = route.accepted_sends
            return False
        if route.concurrency == 1:
            counts = True  # no other send to tell an outage by
        else:
            counts = route.accepted_sends != self._seen  # the receiver takes others, not this
            self._seen = route.accepted_sends
        if counts:
            self.counted += 1
        return counts

    def _exhausted(self) -> bool:
        limit = self.route.max_retries
        return limit is not None and self.counted > limit

    def _gave_up(self, exc: BaseException) -> str:
        limit = self.route.max_retries
        if self.route.concurrency == 1:
            return f"{describe(exc)} (gave up after {limit} retries)"
        return (f"{describe(exc)} (gave up after {self.retries} retries, "
                f"{limit} of them while the sink accepted others)")


def report_failure(route: Route, exc: BaseException, what: str, backoff: Backoff,
                   *, unexpected: bool = False) -> None:
    """A failed open or send: the sink is failing; counted, and logged without flooding."""
    stats = route.stats
    stats.errors += 1
    msg = describe(exc)
    now = time.monotonic()
    # one warning when a failure starts or changes, then a reminder a minute while it lasts
    # (with several sends in flight, at most one every ``WARN_GAP`` seconds: a receiver that
    # fails now and then is not a log line per failed request)
    if route.concurrency > 1:  # (judged on what was logged, not on what was suppressed)
        first = now - route.last_warned >= WARN_GAP and (
            not route.warned or route.warned_error != msg
            or now - route.last_warned >= FAILING_REMINDER)
    else:
        first = (not stats.failing or stats.last_error != msg
                 or now - route.last_warned >= FAILING_REMINDER)
    if first:
        route.warned_error = msg
        route.last_warned = now
        route.warned = True
    stats.failing = True
    stats.last_error = msg
    if unexpected and first:
        log.exception(what, sink=route.name, retry_in=round(backoff.ceiling(), 2))
    elif first:
        log.warning(what, sink=route.name, error=msg, retry_in=round(backoff.ceiling(), 2))
    else:
        log.debug(what, sink=route.name, error=msg)


def recovered(route: Route) -> None:
    """A send or open succeeded with no send of the sink retrying: it is not failing."""
    stats = route.stats
    if stats.failing and not route.retrying:
        stats.failing = False
        stats.last_error = ""
        if route.warned:  # (the failures it ends were logged)
            route.warned = False
            log.info("sink recovered", sink=route.name)


def describe(exc: BaseException) -> str:
    if isinstance(exc, SinkError):
        return str(exc)
    text = str(exc)
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


def cancelled_by_us(exc: BaseException) -> bool:
    """A CancelledError that stops the current task (not one a sink raised on its own)."""
    task = asyncio.current_task()
    return isinstance(exc, asyncio.CancelledError) and (task is None or task.cancelling() > 0)
