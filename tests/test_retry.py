"""The one retry policy: what a failed send becomes (retry, pause the sink, or dead-letter),
whatever the sink's concurrency, decided by ``RetryPolicy.decide`` alone."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from cometstream.backoff import Backoff
from cometstream.errors import SinkError
from cometstream.pipeline.retry import RetryPolicy


def _policy(concurrency: int, max_retries: int | None) -> tuple[RetryPolicy, Any]:
    route = SimpleNamespace(concurrency=concurrency, max_retries=max_retries, accepted_sends=0)
    return RetryPolicy(route, Backoff(0.5, 30.0, rand=lambda: 1.0)), route  # type: ignore[arg-type]


def _err(**kw: Any) -> SinkError:
    return SinkError("s", "HTTP 503", **kw)


def test_one_send_at_a_time_counts_every_failure_but_sink_wide_ones() -> None:
    """concurrency 1: max_retries = 2 gives up at the third counted failure; a failure about
    the sink itself (sink_wide) never counts."""
    policy, _route = _policy(1, 2)
    assert policy.decide(_err(sink_wide=True), 4).retry
    assert policy.decide(_err(), 4).retry
    assert policy.decide(_err(), 4).retry
    v = policy.decide(_err(), 4)
    assert not v.retry and v.refused == 4 and v.why == "sink s: HTTP 503 (gave up after 2 retries)"


def test_several_in_flight_count_a_failure_only_while_the_receiver_takes_others() -> None:
    """concurrency > 1: a receiver that refuses everything (an outage) dead-letters nothing;
    once other sends are accepted between failures, max_retries applies."""
    policy, route = _policy(4, 1)
    for _ in range(10):
        assert policy.decide(_err(), 1).retry  # nothing accepted meanwhile: not counted
    route.accepted_sends += 1
    assert policy.decide(_err(), 1).retry  # counted: 1
    route.accepted_sends += 1
    v = policy.decide(_err(), 1)
    assert not v.retry and v.refused == 1
    assert v.why.endswith("(gave up after 11 retries, 1 of them while the sink accepted others)")


def test_accepted_and_failed_are_read_only_with_one_send_at_a_time() -> None:
    """accepted=k acknowledges the head and resets the backoff; failed=n refuses only those;
    with several sends in flight each send succeeds or fails whole."""
    policy, _route = _policy(1, None)
    policy.backoff.next_delay()
    policy.backoff.next_delay()
    v = policy.decide(_err(accepted=2), 5)
    assert (v.accepted, v.refused, v.retry) == (2, 0, True)
    assert policy.backoff.next_delay() == 0.5  # progress: the backoff starts small again
    v = policy.decide(_err(retryable=False, accepted=1, failed=1), 3)
    assert (v.accepted, v.refused, v.retry) == (1, 1, False)
    concurrent, _route = _policy(4, None)
    v = concurrent.decide(_err(retryable=False, accepted=1, failed=1), 3)
    assert (v.accepted, v.refused, v.retry) == (0, 3, False)


def test_retry_after_pauses_the_sink_and_anything_else_is_retried_as_unexpected() -> None:
    """A Retry-After pauses every send of the sink; an exception that is not a SinkError is
    retried and counted like a retryable failure, marked unexpected (logged with traceback)."""
    policy, _route = _policy(1, 0)
    v = policy.decide(_err(retry_after=7.0, sink_wide=True), 1)
    assert v.retry and v.pause == 7.0
    v = policy.decide(ValueError("bug"), 1)
    assert not v.retry and v.unexpected and v.why == "ValueError: bug (gave up after 0 retries)"
