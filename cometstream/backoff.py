"""Reconnect delays: exponential growth with full jitter and a cap, as a pure generator.

``Backoff`` holds no clock and does no sleeping: the supervisor asks it for the next delay and
sleeps itself, so tests can inject the randomness and scale time.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["Backoff"]


class Backoff:
    """Delays ``uniform(0, min(cap, initial * factor**attempt))`` ("full jitter", AWS architecture blog).

    ``reset()`` after a connection that proved healthy, so the next failure starts small again.
    """

    def __init__(
        self,
        initial: float,
        cap: float,
        *,
        factor: float = 2.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if initial <= 0 or cap < initial or factor < 1:
            raise ValueError("backoff needs 0 < initial <= cap and factor >= 1")
        self.initial = initial
        self.cap = cap
        self.factor = factor
        self._rand = rand
        self.attempt = 0

    def ceiling(self) -> float:
        """The upper bound of the next delay (before jitter)."""
        # min() before the power would overflow for a daemon that fails for weeks.
        exp = min(self.attempt, 64)
        return min(self.cap, self.initial * self.factor**exp)

    def next_delay(self) -> float:
        """The next delay in seconds; each call moves one step up the exponential curve."""
        delay = self.ceiling() * self._rand()
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
