"""``cometstream tap``: a live view of the events passing through a running daemon.

The daemon serves it on a Unix socket, ``tap.sock`` in ``state.dir`` (mode 0600: event data is
for the daemon's user and root only, never on the metrics port). The protocol is JSON Lines:

1. the client sends one request line:
   ``{"sink": null | "NAME", "types": null | [4201, ...], "format": "envelope" | "event"}``;
2. the server answers one line, ``{"ok": true, "server": "comet1", "sinks": ["a", "b"], ...}``
   or ``{"ok": false, "error": "no sink named \\"x\\" (configured: a, b)"}`` (and closes);
3. then one line per event, as published (after redaction), in the requested format. ``sink``
   shows exactly what that sink's filter lets through; ``types`` narrows further.

A client that reads too slowly loses events, never the daemon its pace: each client has a bounded
queue (events and bytes); what does not fit is counted, and the client is told in-band, at the
place of the gap, with a line ``{"tap_dropped": N}``. The callback (``Pipeline.add_tap``) only
filters, appends the event's bytes to those queues and wakes the writers; it is registered only
while at least one client is connected. Closing the connection (or its write side) ends the tap.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
import tempfile
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import orjson
import structlog

from .config import unknown_sink
from .errors import TapBadRequest, TapRefused, TapUnavailable
from .events import FORMATS, Event

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = [
    "SOCKET_NAME",
    "TapRefused",
    "TapServer",
    "TapUnavailable",
    "open_tap",
    "socket_path",
]

SOCKET_NAME: Final = "tap.sock"
#: per client: events queued for it at most, and their bytes at most
QUEUE_EVENTS: Final = 10_000
QUEUE_BYTES: Final = 8 * 1024 * 1024
#: bytes handed to the socket per write (then the writer waits for the client to take them)
WRITE_CHUNK: Final = 256 * 1024
MAX_CLIENTS: Final = 16
REQUEST_TIMEOUT: Final = 10.0
REQUEST_LIMIT: Final = 64 * 1024

log = structlog.get_logger("cometstream.tap")


def socket_path(state_dir: Path | str) -> Path:
    return Path(state_dir) / SOCKET_NAME


class _Marker(bytes):
    """The in-band line telling a client how many events it missed (not an event)."""

    __slots__ = ()


class _Client:
    """One connected tap: its filter, its bounded queue of lines (without newlines)."""

    __slots__ = (
        "dropped",
        "dropped_total",
        "fmt",
        "label",
        "max_bytes",
        "max_events",
        "queue",
        "sent",
        "size",
        "types",
        "wakeup",
    )

    def __init__(self, types: frozenset[int] | None, fmt: str, *, max_events: int,
                 max_bytes: int, label: str) -> None:
        self.types = types
        self.fmt = fmt
        self.queue: deque[bytes] = deque()
        self.size = 0
        self.max_events = max_events
        self.max_bytes = max_bytes
        #: dropped since the last marker was queued
        self.dropped = 0
        self.dropped_total = 0
        self.sent = 0
        self.wakeup: asyncio.Future[None] | None = None
        self.label = label

    def wake(self) -> None:
        w = self.wakeup
        if w is not None:
            self.wakeup = None
            if not w.done():
                w.set_result(None)

    def take_marker(self) -> bytes:
        n = self.dropped
        self.dropped_total += n
        self.dropped = 0
        return _Marker(b'{"tap_dropped":%d}' % n)


class TapServer:
    """Serves ``cometstream tap`` on ``path`` for ``pipeline``'s events. ``start()`` never
    raises: a socket it cannot bind is a warning and the daemon goes on without a tap."""

    def __init__(self, path: Path, pipeline: Pipeline, *, server: str,
                 max_events: int = QUEUE_EVENTS, max_bytes: int = QUEUE_BYTES,
                 max_clients: int = MAX_CLIENTS) -> None:
        self.path = path
        self.pipeline = pipeline
        self.server_name = server
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.max_clients = max_clients
        self.clients: list[_Client] = []
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._tap: Callable[[Event], None] = self._on_event  # one bound method, to remove it
        #: whether ``_tap`` is registered with the pipeline
        self._tapping = False
        self._warned = False

    @property
    def serving(self) -> bool:
        return self._server is not None

    # --- the per-event callback (Pipeline.add_tap) ------------------------------------------------
    def _on_event(self, ev: Event) -> None:
        try:
            envelope: bytes | None = None
            for c in self.clients:
                types = c.types
                if types is not None and ev.type not in types:
                    continue
                q = c.queue
                if len(q) >= c.max_events or c.size >= c.max_bytes:
                    c.dropped += 1
                    continue
                if c.dropped:  # the gap is here: say so before the next event
                    q.append(c.take_marker())
                if c.fmt == "event":
                    line = ev.raw
                else:
                    if envelope is None:
                        envelope = ev.envelope()
                    line = envelope
                q.append(line)
                c.size += len(line)
                if c.wakeup is not None:
                    c.wake()
        except Exception:  # a tap must never break publishing
            if not self._warned:
                self._warned = True
                log.exception("tap callback failed", event=repr(ev))

    # --- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> bool:
        try:
            if not await self._clear_stale():
                return False
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            # bound and made 0600 in a private directory (0700, a new random name), then moved
            # into place: nobody else can swap the file for a symbolic link between the bind
            # and the chmod (which would then change the mode of whatever it points to)
            private = tempfile.mkdtemp(prefix=".tap-", dir=self.path.parent)
            try:
                bound = os.path.join(private, "s")
                sock.bind(bound)
                os.chmod(bound, 0o600)  # before listen(): nobody can connect until it is 0600
                st = os.lstat(bound)
                sock.listen(8)
                sock.setblocking(False)
                os.rename(bound, self.path)
                self._inode = (st.st_dev, st.st_ino)
                self._server = await asyncio.start_unix_server(
                    self._handle, sock=sock, limit=REQUEST_LIMIT)
            except BaseException:
                sock.close()
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(private, "s"))
                self._remove_socket_file()
                raise
            finally:
                with contextlib.suppress(OSError):
                    os.rmdir(private)
        except OSError as exc:
            log.warning("live tap not available (cometstream tap)", path=str(self.path),
                        error=exc.strerror or str(exc))
            return False
        log.debug("tap listening", path=str(self.path))
        return True

    async def _clear_stale(self) -> bool:
        """Remove a socket file left by a daemon that died; keep one a live process serves."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return True
        if not stat.S_ISSOCK(st.st_mode):
            log.warning("live tap not available: the path exists and is not a socket",
                        path=str(self.path))
            return False
        try:
            async with asyncio.timeout(1.0):
                _r, w = await asyncio.open_unix_connection(str(self.path))
        except (OSError, TimeoutError):
            os.unlink(self.path)  # nobody answers: stale (a daemon that crashed)
            log.info("stale tap socket replaced", path=str(self.path))
            return True
        w.transport.abort()
        log.warning("live tap not available: another process serves its socket (two daemons "
                    "with one state.dir?)", path=str(self.path))
        return False

    def _remove_socket_file(self) -> None:
        """Unlink the socket file if it is still ours (not one a newer daemon bound)."""
        if self._inode is None:
            return
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        self._inode = None

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._remove_socket_file()
        self._unregister_all()

    # --- one connection ---------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        client: _Client | None = None
        try:
            client = await self._handshake(reader, writer)
            if client is None:
                return
            self._register(client)
            log.info("tap connected", tap=client.label)
            pump = asyncio.ensure_future(self._pump(client, writer))
            eof = asyncio.ensure_future(self._until_eof(reader))
            try:
                await asyncio.wait({pump, eof}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                pump.cancel()
                eof.cancel()
                await asyncio.gather(pump, eof, return_exceptions=True)
        except (asyncio.CancelledError, ConnectionError, OSError, TimeoutError):
            pass  # the client went away, or the daemon is stopping: nothing to report
        except Exception:  # a bug: one line with the traceback, the daemon goes on
            log.exception("tap connection failed")
        finally:
            if client is not None:
                self._unregister(client)
                log.info("tap disconnected", tap=client.label, events=client.sent,
                         dropped=client.dropped_total + client.dropped)
            writer.transport.abort()
            if task is not None:
                self._handlers.discard(task)

    async def _handshake(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> _Client | None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                line = await reader.readline()
        except TimeoutError:
            await self._refuse(writer, "no request within "
                               f"{REQUEST_TIMEOUT:g} s")
            return None
        except (ValueError, asyncio.LimitOverrunError):
            await self._refuse(writer, f"request line longer than {REQUEST_LIMIT} bytes")
            return None
        if not line:
            return None
        try:
            client = self._parse_request(line)
        except TapBadRequest as exc:
            await self._refuse(writer, str(exc))
            return None
        if len(self.clients) >= self.max_clients:
            await self._refuse(writer, f"too many taps ({self.max_clients} connected)")
            return None
        sinks = [r.name for r in self.pipeline.routes]
        writer.write(orjson.dumps({
            "ok": True, "server": self.server_name, "sinks": sinks,
            "types": sorted(client.types) if client.types is not None else None,
            "format": client.fmt,
        }) + b"\n")
        await writer.drain()
        return client

    def _parse_request(self, line: bytes) -> _Client:
        try:
            req = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise TapBadRequest("bad request: not a JSON line") from None
        if not isinstance(req, dict):
            raise TapBadRequest("bad request: expected a JSON object")
        fmt = req.get("format", "envelope")
        if fmt not in FORMATS:
            raise TapBadRequest(f"bad request: format must be one of {', '.join(FORMATS)}")
        types: frozenset[int] | None = None
        raw_types = req.get("types")
        if raw_types is not None:
            if (not isinstance(raw_types, list) or not raw_types
                    or not all(type(t) is int for t in raw_types)):
                raise TapBadRequest("bad request: types must be null or a list of event type numbers")
            types = frozenset(raw_types)
        sink = req.get("sink")
        label = "all events"
        if sink is not None:
            routes = {r.name: r for r in self.pipeline.routes}
            if not isinstance(sink, str) or sink not in routes:
                shown = sink if isinstance(sink, str) else repr(sink)
                raise TapBadRequest(unknown_sink(shown, list(routes)))
            sink_types = routes[sink].types
            if sink_types is not None:
                types = sink_types if types is None else types & sink_types
            label = f"sink {sink}"
        if raw_types is not None:
            label += f", types {','.join(map(str, sorted(raw_types)))}"
        return _Client(types, fmt, max_events=self.max_events, max_bytes=self.max_bytes,
                       label=label)

    @staticmethod
    async def _refuse(writer: asyncio.StreamWriter, error: str) -> None:
        log.info("tap refused", error=error)
        writer.write(orjson.dumps({"ok": False, "error": error}) + b"\n")
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await writer.drain()
                writer.write_eof()
                await writer.drain()

    @staticmethod
    async def _until_eof(reader: asyncio.StreamReader) -> None:
        """The client sends nothing after its request; its EOF (or a reset) ends the tap."""
        while await reader.read(65536):
            pass

    async def _pump(self, c: _Client, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        q = c.queue
        while True:
            if not q:
                if c.dropped:  # caught up after a gap with nothing behind it
                    q.append(c.take_marker())
                    continue
                c.wakeup = loop.create_future()
                await c.wakeup
                continue
            parts: list[bytes] = []
            size = 0
            events = 0
            while q and size < WRITE_CHUNK:
                line = q.popleft()
                parts.append(line)
                size += len(line)
                if type(line) is not _Marker:
                    events += 1
                    c.size -= len(line)
            parts.append(b"")
            writer.write(b"\n".join(parts))
            c.sent += events
            await writer.drain()

    # --- registration: the callback exists only while someone taps ----------------------------------
    def _register(self, c: _Client) -> None:
        self.clients.append(c)
        if not self._tapping:
            self._tapping = True
            self.pipeline.add_tap(self._tap)

    def _unregister(self, c: _Client) -> None:
        with contextlib.suppress(ValueError):
            self.clients.remove(c)
        if not self.clients:
            self._unregister_all()

    def _unregister_all(self) -> None:
        self.clients.clear()
        if self._tapping:
            self._tapping = False
            self.pipeline.remove_tap(self._tap)


# --- the client side (cometstream tap) ----------------------------------------------------------------
def open_tap(path: Path, request: dict[str, Any], *,
             timeout: float = 10.0) -> tuple[socket.socket, dict[str, Any], bytes]:
    """Connect, send ``request``, read the answer. Returns the socket (blocking), the answer
    and the bytes already received after it (the first events)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise TapUnavailable(f"no socket at {path}") from None
        except ConnectionRefusedError:
            raise TapUnavailable(f"nothing listens on {path}") from None
        except PermissionError:
            raise TapUnavailable(f"permission denied on {path} (tap as the daemon's user or "
                                 "root)") from None
        except OSError as exc:
            if exc.errno in (errno.ENOTSOCK, errno.ECONNREFUSED, errno.ENOENT):
                raise TapUnavailable(f"nothing listens on {path}") from None
            raise TapUnavailable(f"cannot connect to {path}: {exc.strerror or exc}") from None
        sock.sendall(orjson.dumps(request) + b"\n")
        buf = b""
        while b"\n" not in buf:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise TapUnavailable(f"no answer on {path} within {timeout:g} s") from None
            except ConnectionError:
                chunk = b""
            if not chunk:
                raise TapUnavailable(f"the daemon closed the connection on {path}")
            buf += chunk
        head, _, rest = buf.partition(b"\n")
        try:
            answer = orjson.loads(head)
        except orjson.JSONDecodeError:
            raise TapUnavailable(f"not a cometstream tap at {path}") from None
        if not isinstance(answer, dict):
            raise TapUnavailable(f"not a cometstream tap at {path}")
        if not answer.get("ok"):
            raise TapRefused(str(answer.get("error") or "refused"))
        sock.settimeout(None)
        return sock, answer, rest
    except BaseException:
        sock.close()
        raise
