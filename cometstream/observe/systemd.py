"""systemd's notify protocol, without libsystemd: READY, RELOADING, STATUS, WATCHDOG, STOPPING.

A datagram to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). Outside
systemd (no ``NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping

import structlog

from .logging import scrub

__all__ = ["Notifier", "connected_status"]

log = structlog.get_logger("cometstream.systemd")


def connected_status(server: str, events: int) -> str:
    """``STATUS=`` while connected: ``connected to comet1, 12 345 events`` (thousands apart by
    a space, the server's name as configured)."""
    count = f"{events:,}".replace(",", " ")  # only the number's own commas
    return f"connected to {server}, {count} events"


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if addr.startswith("@"):
            self.address = "\0" + addr[1:]
        elif addr.startswith("/"):
            self.address = addr
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2
        self._sock: socket.socket | None = None
        self._last_status = ""
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, message: str) -> None:
        if self.address is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # never block the event loop on a notify socket nobody drains
                self._sock.setblocking(False)
            self._sock.sendto(message.encode("utf-8", "backslashreplace"), self.address)
        except OSError as exc:
            if not self._warned:  # once: a missing socket would otherwise flood the log
                self._warned = True
                log.warning("systemd notify failed", error=str(exc), socket=self.address)

    def ready(self) -> None:
        self.notify("READY=1")

    def reloading(self) -> None:
        """A reload starts: ``RELOADING=1`` with ``MONOTONIC_USEC=`` (CLOCK_MONOTONIC, which
        systemd 253's ``Type=notify-reload`` requires; older versions ignore both). The reload
        ends with :meth:`ready`, whatever its outcome."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def status(self, text: str) -> None:
        # STATUS= is shown to every local user (systemctl status): what a peer wrote in an
        # error is masked like the logs, and kept on one line
        text = " ".join(scrub(text).splitlines())
        if text != self._last_status:
            self._last_status = text
            self.notify(f"STATUS={text}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    async def watchdog(self) -> None:
        """Send WATCHDOG=1 at half of WATCHDOG_USEC from the event loop (so a stuck loop misses it)."""
        if self.watchdog_interval is None or self.address is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
