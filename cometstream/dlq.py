"""``cometstream dlq list|replay|purge``: the events sinks refused for good.

A sink that refuses an event for good (a webhook answering 400, a retry budget spent) leaves it
in the ledger's ``dead_letters`` table (``ledger.db`` in ``state.dir``, see
:mod:`cometstream.store.deadletters`): one row per event per sink, with the error and the event's
bytes.
These commands read and change it through the same interface as the daemon, with SQLite's own
locking, so they work while the daemon runs (WAL: readers never wait; a delete waits up to
:data:`BUSY_TIMEOUT_MS` for the daemon's commit) and while it is stopped.

- ``list``: a table (or JSON Lines with each event's bytes spliced in unchanged) and a summary
  per sink;
- ``replay --sink NAME``: builds that sink from the configuration, sends its dead letters in id
  order in batches of :data:`BATCH`, and deletes each batch only once the sink has accepted it
  (``SinkError.accepted`` counts too). The first failure stops the replay; what was not accepted
  stays. Only the rows present when the replay started are sent (the daemon may add more
  meanwhile), and one replay at a time may run on a ledger (a lock file beside it);
- ``purge``: deletes by sink, id and age; asks for ``--yes``.

Outcomes (the CLI turns them into exit codes: 0 done, also when there is nothing to do; 1 a
:class:`DlqError`; 2 a ``DlqError`` with ``usage``, a configuration problem, or ``purge``
without ``--yes``): each command returns whether it did what was asked, and raises
:class:`DlqError` when it could not.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import re
import shutil
import sqlite3
import stat
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

import orjson

from .errors import DlqError

if TYPE_CHECKING:
    from .config import Config, SinkConfig
    from .store import DeadLetter, DeadLetters

__all__ = ["BATCH", "add_parser", "parse_duration", "run_dlq"]

#: dead letters per ``send`` (and per delete) during a replay
BATCH: Final = 100
#: how long a delete waits for the daemon's own write transaction before giving up
BUSY_TIMEOUT_MS: Final = 30_000
#: characters of the error in ``list``'s table when it is not shown on a terminal
_EXCERPT: Final = 120
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> float:
    """``30m``, ``12h``, ``7d``, ``2w``, ``1d12h``, ``90s`` → seconds."""
    t = text.strip().lower()
    pos = 0
    total = 0.0
    for m in _DURATION.finditer(t):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not t or pos != len(t):
        raise DlqError(f'--older-than: expected a duration like 7d, 12h or 30m, got "{text}"',
                       usage=True)
    return total


# --- the command line -------------------------------------------------------------------------
def add_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``dlq`` and its actions on the CLI's subparsers (``common`` adds -c/--log-level)."""
    p = sub.add_parser("dlq", help="list, replay or purge the events sinks refused for good",
                       description="The dead letters: events a sink refused for good (kept in "
                       "the ledger in state.dir). Works beside a running daemon.")
    actions = p.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    ls = actions.add_parser("list", help="show the dead letters (oldest first)",
                            description="Show the dead letters, oldest first: a table with a "
                            "summary per sink, or JSON Lines with each event's bytes.")
    common(ls)
    ls.add_argument("--sink", metavar="NAME", help="only this sink's")
    ls.add_argument("--limit", type=_positive_int, metavar="N", help="at most N rows")
    ls.add_argument("--json", action="store_true",
                    help="JSON Lines with each event's bytes as received")
    rp = actions.add_parser("replay", help="send a sink's dead letters to it again",
                            description="Send a sink's dead letters to it again, as it is "
                            "configured now; each batch leaves the ledger once the sink "
                            "accepted it. Stops at the first failure (exit 1).")
    common(rp)
    rp.add_argument("--sink", metavar="NAME", required=True, help="the sink (as configured)")
    rp.add_argument("--id", dest="ids", type=_positive_int, nargs="+", action="extend",
                    default=[], metavar="ID", help="only these dead letters")
    rp.add_argument("--dry-run", action="store_true", help="say what would be sent; send nothing")
    pg = actions.add_parser("purge", help="delete dead letters",
                            description="Delete the dead letters that match; without --yes, "
                            "say how many would go (exit 2).")
    common(pg)
    pg.add_argument("--sink", metavar="NAME", help="only this sink's")
    pg.add_argument("--id", dest="ids", type=_positive_int, nargs="+", action="extend",
                    default=[], metavar="ID", help="only these dead letters")
    pg.add_argument("--older-than", metavar="DURATION",
                    help="only those that failed longer ago than this (7d, 12h, 30m)")
    pg.add_argument("--yes", action="store_true", help="really delete")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _err(msg: str) -> None:
    from .observe.logging import scrub  # (a sink's failure may quote the receiver)

    print(f"cometstream dlq: {scrub(msg)}", file=sys.stderr, flush=True)


def run_dlq(args: argparse.Namespace) -> bool:
    """Run ``cometstream dlq ACTION``: whether it did what was asked (False: ``purge`` without
    ``--yes`` only said what it would delete). Raises :class:`DlqError` when it could not (and
    configuration errors: the CLI says them)."""
    from .config import load_config_without_secrets
    from .observe.logging import configure_logging
    from .sinks import resolve_sink_class

    # the server's password is not needed; the sinks' secrets only to replay (send) to them
    cfg = load_config_without_secrets(args.config, resolve_sink=resolve_sink_class,
                                      sink_secrets=args.dlq_command == "replay")
    configure_logging(args.log_level or "warning", cfg.log.format)
    path = spool_path(cfg)
    try:
        if args.dlq_command == "list":
            return cmd_list(cfg, args)
        if args.dlq_command == "replay":
            return cmd_replay(cfg, args)
        if args.dlq_command == "purge":
            return cmd_purge(cfg, args)
    except sqlite3.Error as exc:
        raise DlqError(f"ledger {path}: {exc}") from exc
    except BrokenPipeError:  # `dlq list | head`: stop quietly (and keep the final flush quiet)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return True
    raise DlqError(f"unknown action {args.dlq_command!r}", usage=True)


# --- the spool ----------------------------------------------------------------------------------
def spool_path(cfg: Config) -> Path:
    from .store import FILENAME

    return cfg.state.dir / FILENAME


def open_spool(cfg: Config) -> DeadLetters:
    """The daemon's ledger's dead letters (never created here); a busy timeout for writes beside
    the daemon."""
    from .errors import LedgerCorrupt, LedgerError
    from .store import DeadLetters

    path = spool_path(cfg)
    if not path.is_file():
        raise DlqError(f"no ledger at {path}: the daemon has not run with this state.dir")
    try:
        return DeadLetters.open(path, busy_timeout_ms=BUSY_TIMEOUT_MS)
    except (LedgerCorrupt, LedgerError) as exc:
        raise DlqError(f"cannot open the ledger {path}: {exc}") from None


def _unknown_sink(cfg: Config, name: str, letters: DeadLetters | None) -> DlqError:
    from .config import unknown_sink

    extra = ""
    if letters is not None:
        orphans = [s for s in letters.sinks() if s not in {sc.name for sc in cfg.sinks}]
        if orphans:
            extra = f"; with dead letters but no longer configured: {', '.join(orphans)}"
    return DlqError(f"--sink: {unknown_sink(name, [sc.name for sc in cfg.sinks], extra)}",
                    usage=True)


def _check_sink(cfg: Config, letters: DeadLetters, name: str | None) -> None:
    """A sink named on the command line must be configured or have dead letters (a sink removed
    from the config keeps its dead letters until they are purged)."""
    if name is None or any(sc.name == name for sc in cfg.sinks):
        return
    if letters.has(name):
        return
    raise _unknown_sink(cfg, name, letters)


def _local(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _plural(n: int, word: str = "dead letter") -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


# --- list -----------------------------------------------------------------------------------------
def json_line(row: DeadLetter) -> bytes:
    """``{"id","sink","failed_at","error","event"}`` with the event's bytes as they are."""
    head = orjson.dumps({"id": row.id, "sink": row.sink, "failed_at": row.failed_at,
                         "error": row.error})
    raw = bytes(row.raw)
    if b"\n" in raw or b"\r" in raw:  # never in what the daemon stores; keep one line per row
        raw = raw.replace(b"\r", b" ").replace(b"\n", b" ")
    return head[:-1] + b',"event":' + raw + b"}\n"


def _type_name(row: DeadLetter) -> str:
    from .events import Event

    ev = Event(bytes(row.raw), None, row.type, row.origin, row.received_at)  # type: ignore[arg-type]
    try:
        return ev.type_name
    except ValueError:  # bytes that do not parse: the number will do
        return f"SEVT_UNKNOWN_{row.type}"


def _excerpt(row: DeadLetter, width: int) -> str:
    text = row.error
    text = text.removeprefix(f"sink {row.sink}: ")  # the sink column says it already
    text = " ".join(text.split())
    width = max(width, 20)
    return text if len(text) <= width else text[:width - 3] + "..."


def cmd_list(cfg: Config, args: argparse.Namespace, out: IO[bytes] | None = None) -> bool:
    out = out if out is not None else sys.stdout.buffer
    out_tty = out.isatty()
    letters = open_spool(cfg)
    try:
        _check_sink(cfg, letters, args.sink)
        summary = letters.summary(args.sink)
        total = sum(r[1] for r in summary)
        none = "no dead letters" + (f" for sink {args.sink}" if args.sink else "")
        if args.json:
            for row in letters.rows(sink=args.sink, limit=args.limit):
                out.write(json_line(row))
            out.flush()
            if not total:
                print(none, file=sys.stderr)
            return True
        if not total:
            out.write(f"{none}\n".encode())
            out.flush()
            return True
        cells = [((str(r.id), r.sink, _local(r.failed_at), _type_name(r)), r)
                 for r in letters.rows(sink=args.sink, limit=args.limit)]
    finally:
        letters.close()
    head = ("ID", "SINK", "FAILED AT", "TYPE")
    widths = [max(len(h), *(len(texts[i]) for texts, _ in cells)) for i, h in enumerate(head)]
    # on a terminal the error fits the width; piped, an excerpt of a fixed length
    fixed = sum(widths) + 2 * len(widths)
    room = shutil.get_terminal_size().columns - fixed - 1 if out_tty else _EXCERPT
    lines = ["  ".join([*(h.ljust(w) for h, w in zip(head, widths, strict=True)), "ERROR"])]
    for texts, row in cells:
        first = [texts[0].rjust(widths[0])] + [t.ljust(w) for t, w in
                                               zip(texts[1:], widths[1:], strict=True)]
        lines.append("  ".join([*first, _excerpt(row, room)]))
    lines.append("")
    for sink, count, oldest, newest in summary:
        lines.append(f"{sink}: {_plural(count)}, oldest {_local(oldest)}, newest {_local(newest)}")
    if len(cells) < total:
        lines.append(f"(showing the first {len(cells):,} of {total:,}; --limit)")
    out.write(("\n".join(lines) + "\n").encode())
    out.flush()
    return True


# --- replay ---------------------------------------------------------------------------------------
class _Progress:
    """``replay to NAME: 300/1,000`` on a terminal (stderr); silent otherwise."""

    def __init__(self, sink: str, total: int, out: IO[str] = sys.stderr) -> None:
        self.sink = sink
        self.total = total
        self.out = out
        self.tty = out.isatty()
        self._last = 0.0
        self.shown = False

    def update(self, done: int) -> None:
        now = time.monotonic()
        if not self.tty or now - self._last < 0.1:
            return
        self._last = now
        self.shown = True
        self.out.write(f"\rreplay to {self.sink}: {done:,}/{self.total:,}   ")
        self.out.flush()

    def end(self) -> None:
        if self.shown:
            self.out.write("\r\033[K")
            self.out.flush()


class _Replay:
    def __init__(self, sink: str, total: int) -> None:
        self.sink = sink
        self.total = total
        self.sent = 0


def _lock(path: Path) -> int:
    """One replay per spool at a time: two would send the same events twice."""
    import fcntl

    lock = path.with_name(f"{path.name}.replay-lock")
    try:
        # never through a symbolic link (a local user could point it at any file, which this
        # command, often run as root, would create and give the ledger's owner), private
        fd = os.open(lock, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        why = "it is a symbolic link (not followed)" if exc.errno == errno.ELOOP \
            else exc.strerror or str(exc)
        raise DlqError(f"cannot create {lock}: {why}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DlqError(f"cannot use {lock}: not a regular file")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise DlqError(f"another dlq replay is running on {path}") from None
    except DlqError:
        os.close(fd)
        raise
    _keep_owner_of(fd, path)
    return fd


def _keep_owner_of(fd: int, path: Path) -> None:
    """Run as root beside a daemon with its own user (``DynamicUser=yes``), give a file this
    command created (open as ``fd``: the file itself, never where a link points) the spool's
    owner (SQLite does the same for ``-wal`` and ``-shm``); private either way."""
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077 and st.st_uid == os.geteuid():
            os.fchmod(fd, 0o600)
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            owner = path.stat()
            if owner.st_uid != 0 and st.st_uid == 0:
                os.fchown(fd, owner.st_uid, owner.st_gid)
    except OSError:
        pass


def cmd_replay(cfg: Config, args: argparse.Namespace) -> bool:
    from .sinks import build_sink

    sc = next((s for s in cfg.sinks if s.name == args.sink), None)
    if sc is None:  # replay needs the sink's configuration: name the configured ones
        try:
            letters: DeadLetters | None = open_spool(cfg)
        except (DlqError, sqlite3.Error):  # the usage error comes first
            letters = None
        try:
            raise _unknown_sink(cfg, args.sink, letters)
        finally:
            if letters is not None:
                letters.close()
    sink = build_sink(sc)  # ConfigError: exit 2 (before anything is sent)
    letters = open_spool(cfg)
    fd = -1
    try:
        ids = sorted(set(args.ids))
        if ids:
            found = {i for i, _sink in letters.select(sc.name, ids)}
            missing = [i for i in ids if i not in found]
            if missing:
                raise DlqError(f"--id: sink {sc.name} has no dead letter "
                               f"{', '.join(map(str, missing))}", usage=True)
        total, max_id, first = letters.span(sc.name, ids)
        if not total:
            print(f"no dead letters for sink {sc.name}", file=sys.stderr)
            return True
        if args.dry_run:
            span = f"id {first}" if total == 1 else f"ids {first} to {max_id}"
            print(f"would replay {_plural(total)} ({span}) to sink {sc.name} "
                  f"({sc.type}, format {sc.format})", file=sys.stderr)
            return True
        fd = _lock(spool_path(cfg))
        state = _Replay(sc.name, total)
        try:
            error = asyncio.run(_replay(cfg, sc, sink, letters, ids, max_id, state))
        except KeyboardInterrupt:
            error = "interrupted"
        left = letters.span(sc.name, ids, max_id)[0]
        if error is None:
            print(f"replayed {_plural(state.sent)} to sink {sc.name}", file=sys.stderr)
            return True
        raise DlqError(f"replay to sink {sc.name} stopped: {error}; replayed {state.sent:,}, "
                       f"{left:,} remain")
    finally:
        if fd >= 0:
            os.close(fd)
        letters.close()


async def _replay(cfg: Config, sc: SinkConfig, sink: Any, letters: DeadLetters,
                  ids: Sequence[int], max_id: int | None, state: _Replay) -> str | None:
    """Send the rows, deleting each batch once accepted; the error that stopped it, or None."""
    from .errors import SinkError
    from .events import Event

    progress = _Progress(sc.name, state.total)
    try:
        try:
            await sink.open()
        except SinkError as exc:
            return f"cannot open the sink: {exc}"
        except Exception as exc:  # noqa: BLE001 - a third-party sink's own: one line still
            return f"cannot open the sink: {exc.__class__.__name__}: {exc}"
        rows = letters.rows(sink=sc.name, ids=ids, max_id=max_id, page=BATCH)
        while True:
            batch = list(islice(rows, BATCH))
            if not batch:
                return None
            events = []
            for r in batch:
                ev = Event(bytes(r.raw), None, r.type, r.origin,  # type: ignore[arg-type]
                           r.received_at, cfg.server.name)
                ev.seq = r.seq
                events.append(ev)
            error = None
            accepted = len(batch)
            try:
                await sink.send(events)
            except SinkError as exc:
                accepted = min(max(exc.accepted, 0), len(batch))
                error = str(exc)
            except Exception as exc:  # noqa: BLE001 - as the pipeline: a failed send
                accepted = 0
                error = f"{exc.__class__.__name__}: {exc}"
            if accepted:
                try:
                    letters.delete([r.id for r in batch[:accepted]])
                except sqlite3.Error as exc:
                    return (f"{accepted} accepted by the sink could not be removed from the spool "
                            f"({exc}): the next replay sends them again")
                state.sent += accepted
            progress.update(state.sent)
            if error is not None:
                return error
    finally:
        progress.end()
        try:
            await asyncio.wait_for(sink.aclose(), max(cfg.shutdown_timeout, 5.0))
        except Exception as exc:  # noqa: BLE001 - accepted is accepted; say it, go on
            _err(f"closing sink {sc.name}: {exc.__class__.__name__}: {exc}")


# --- purge ----------------------------------------------------------------------------------------
def cmd_purge(cfg: Config, args: argparse.Namespace) -> bool:
    cutoff = time.time() - parse_duration(args.older_than) if args.older_than else None
    letters = open_spool(cfg)
    try:
        _check_sink(cfg, letters, args.sink)
        ids = sorted(set(args.ids))
        chosen = letters.select(args.sink, ids, cutoff)
        missing = ""
        if ids:
            gone = sorted(set(ids) - {i for i, _ in chosen})
            if gone:
                missing = f" (no match for id {', '.join(map(str, gone))})"
        if not chosen:
            print(f"no dead letters match{missing}", file=sys.stderr)
            return True
        per: dict[str, int] = {}
        for _, sink in chosen:
            per[sink] = per.get(sink, 0) + 1
        detail = ", ".join(f"{s}: {n:,}" for s, n in sorted(per.items()))
        if not args.yes:
            print(f"would delete {_plural(len(chosen))} ({detail}){missing}; "
                  "add --yes to delete them", file=sys.stderr)
            return False
        n = letters.delete([i for i, _ in chosen])
        print(f"deleted {_plural(n)} ({detail}){missing}", file=sys.stderr)
        return True
    finally:
        letters.close()
