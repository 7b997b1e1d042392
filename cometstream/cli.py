"""The command line: ``run``, ``check``, ``backfill``, ``dlq``, ``tap``, ``demo``, ``simulate``,
``--version``.

``main(argv) -> int`` is the only place that turns errors into exit codes and one-line messages:
0 clean stop; 2 usage or configuration error (a wrong argument is a :class:`UsageError`, said
without "config:"); 3 credentials rejected on the first login; 1 the command could not do its
job for another reason (a server unreachable by ``check --connect``, no daemon to ``tap``, a
``dlq replay`` that stopped), or an unexpected error, then with its traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
from collections.abc import Coroutine, Sequence
from typing import Any

import structlog

from . import __version__
from .config import (
    DEFAULT_PATH,
    Config,
    load_config,
    load_config_without_secrets,
    parse_config,
    parse_listen,
    unknown_sink,
)
from .daemon import Daemon
from .errors import (
    ApiAuthError,
    ApiError,
    ConfigError,
    ConfigErrors,
    CredentialsRejected,
    DlqError,
    SinkError,
    StreamError,
    TapRefused,
    TapUnavailable,
    UsageError,
)
from .observe.logging import configure_logging, register_secret, scrub
from .sinks import Sink, build_sink, resolve_sink_class

__all__ = ["main"]

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2
EXIT_CREDENTIALS = 3
DEMO_USER = "demo"
DEMO_PASSWORD = "demo password & more = fun"  # exercises form/frame escaping on purpose
DEMO_LISTEN = "127.0.0.1:9780"

log = structlog.get_logger("cometstream.cli")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cometstream",
        description="Deliver a Comet Backup Server's live events to sinks.",
        epilog="Exit codes: 0 clean stop, 1 the command could not do its job (see its message), "
               "2 usage or configuration error, 3 credentials rejected on the first login.",
    )
    p.add_argument("--version", action="version", version=f"cometstream {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-c", "--config", default=DEFAULT_PATH,
                        help="configuration file (default %(default)s)")
        sp.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        help="override log.level")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=description)

    run = command("run", "run the daemon in the foreground",
                  "Run the daemon in the foreground: hold the event stream, deliver the events "
                  "to the sinks, serve /metrics. SIGTERM or SIGINT drains the queues and exits 0; "
                  "SIGHUP reopens the files of file sinks.")
    common(run)
    chk = command("check", "validate the configuration",
                  "Validate the configuration and the places the daemon writes to (state.dir, "
                  "file sinks); print ok or one line per problem.")
    common(chk)
    chk.add_argument("--connect", action="store_true",
                     help="also log in to the event stream and the admin API once")
    bf = command("backfill", "replay historical job completions to the sinks",
                 "Send the job completions of a past period (origin backfill) through the "
                 "configured sinks, read from the server's admin API one day at a time.")
    common(bf)
    bf.add_argument("--since", required=True, help="start: 2026-11-01, 2026-11-01T12:30 "
                    "(local time unless an offset is given) or Unix seconds")
    bf.add_argument("--until", default=None, help="end, exclusive (default: now)")
    bf.add_argument("--sink", action="append", default=[], metavar="NAME",
                    help="only this sink (repeatable; default: all)")
    tap = command("tap", "watch the events passing through a running daemon",
                  "Show the events passing through the running daemon, live: readable lines on "
                  "a terminal, JSON Lines when piped. Needs no password: it reads the "
                  "configuration only for state.dir, the server's name and the sink names.")
    tap.add_argument("-c", "--config", default=DEFAULT_PATH,
                     help="the daemon's configuration file (default %(default)s)")
    tap.add_argument("--sink", default=None, metavar="NAME",
                     help="only what this sink's filter lets through")
    tap.add_argument("--types", default=None, metavar="T1,T2",
                     help="only these event types (SEVT names or numbers, comma-separated)")
    tap.add_argument("--format", choices=("envelope", "event"), default="envelope",
                     help="JSON Lines format when stdout is not a terminal (default %(default)s)")
    tap.add_argument("--count", type=_positive_int, default=None, metavar="N",
                     help="stop after N events")
    demo = command("demo", "the built-in simulator and the daemon against it",
                   "Start a simulated Comet Server and the daemon against it, with a stdout "
                   "sink and the metrics endpoint; runs until Ctrl-C, or until the program "
                   "reading its output exits (such as head).")
    demo.add_argument("--rate", type=_rate, default=4.0,
                      help="simulated events per second (default %(default)g)")
    demo.add_argument("--listen", default=DEMO_LISTEN, metavar="HOST:PORT",
                      help="/metrics, /healthz and /readyz (default %(default)s; port 0 picks "
                      "a free one, \"\" turns them off)")
    demo.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                      default="info", help="log level (default %(default)s)")
    sim = command("simulate", "run the Comet Server simulator alone",
                  "Run the built-in Comet Server simulator alone (event stream and admin API), "
                  "for a daemon or a test to connect to.")
    sim.add_argument("--listen", default="127.0.0.1:8060", metavar="HOST:PORT",
                     help="where to listen (default %(default)s)")
    sim.add_argument("--username", default="admin",
                     help="the admin user it accepts (default %(default)s)")
    sim.add_argument("--password", default="admin",
                     help="that user's password (default %(default)s)")
    sim.add_argument("--rate", type=_rate, default=5.0,
                     help="events per second (default %(default)g)")
    sim.add_argument("--seed", type=int, default=None,
                     help="seed of the simulated world and its events (default: random)")
    from .dlq import add_parser as add_dlq_parser

    add_dlq_parser(sub, common)
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _rate(text: str) -> float:
    """Events per second: a finite number from 0 (none) to 100,000."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 100_000:  # (NaN and infinities fail too)
        raise argparse.ArgumentTypeError(
            f"expected events per second from 0 to 100000, got {text!r}")
    return value


def _run_daemon(coro: Coroutine[Any, Any, int]) -> int:
    """``run`` and ``demo``: the daemon's interpreter settings (:mod:`cometstream.runtime`, their
    one owner), then the event loop."""
    from .runtime import tune_for_daemon

    tune_for_daemon()
    return _run_async(coro)


def _run_async(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _err(msg: str) -> None:
    # messages quote what the server or a receiver answered: masked like the logs
    print(f"cometstream: {scrub(msg)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 for --help/--version
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "check":
            return _cmd_check(args)
        if args.command == "demo":
            return _cmd_demo(args)
        if args.command == "backfill":
            return _cmd_backfill(args)
        if args.command == "simulate":
            return _cmd_simulate(args)
        if args.command == "dlq":
            from .dlq import run_dlq

            return EXIT_OK if run_dlq(args) else EXIT_USAGE  # (not done: purge without --yes)
        if args.command == "tap":
            return _cmd_tap(args)
    except CredentialsRejected as exc:
        _err(str(exc))
        return EXIT_CREDENTIALS
    except ApiError as exc:
        _err(f"api: {exc}")
        return EXIT_CREDENTIALS if isinstance(exc, ApiAuthError) else EXIT_FATAL
    except DlqError as exc:
        print(f"cometstream dlq: {scrub(str(exc))}", file=sys.stderr, flush=True)
        return EXIT_USAGE if exc.usage else EXIT_FATAL
    except UsageError as exc:  # a command-line argument, not the configuration file
        _err(str(exc))
        return EXIT_USAGE
    except ConfigErrors as exc:
        for e in exc.errors:
            _err(f"config: {e}")
        return EXIT_USAGE
    except ConfigError as exc:
        _err(f"config: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - the unexpected: one line, and the traceback for a bug report
        _err(f"fatal: {exc.__class__.__name__}: {exc}")
        import traceback

        print(scrub(traceback.format_exc()), end="", file=sys.stderr)
        return EXIT_FATAL
    return EXIT_USAGE


def _load(args: argparse.Namespace, *, credentials_later: bool = False) -> Config:
    cfg = load_config(args.config, resolve_sink=resolve_sink_class,
                      credentials_later=credentials_later)
    register_secret(*cfg.server.secret_values())
    level = args.log_level or cfg.log.level
    configure_logging(level, cfg.log.format)
    return cfg


def _warn_exposed(cfg: Config, *, logged: bool) -> None:
    """Once per start of check and run: each file holding a secret that others may read."""
    from .config import exposed_secrets

    for found in exposed_secrets(cfg):
        if logged:
            log.warning("secret readable by others", file=str(found.path),
                        mode=f"{found.mode:04o}", holds=list(found.keys), fix="chmod 600")
        else:
            _err(f"warning: {found}")


async def _serve(daemon: Daemon) -> int:
    stop = asyncio.Event()
    daemon.install_signal_handlers(stop)
    await daemon.run(stop)
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    _warn_exposed(cfg, logged=True)
    try:
        daemon = Daemon(cfg)
        daemon.reloader.level_override = args.log_level  # (the command line's stays)
        return _run_daemon(_serve(daemon))
    except CredentialsRejected as exc:
        raise CredentialsRejected(f"login rejected by {cfg.server.name} for user "
                                  f"{cfg.server.username!r} ({_login_what(cfg)}): check them",
                                  reply=exc.reply) from exc


def _login_what(cfg: Config) -> str:
    """The auth type and where each secret of the login came from (never a value)."""
    sources = cfg.server.login_sources()
    return f"{cfg.server.auth_type}, {sources}" if sources else cfg.server.auth_type


#: check's note for a secret set nowhere, which run takes from the units' credential
_PENDING_NOTE = ("server.{key}: set nowhere here; run takes it from the systemd credential "
                 "\"{key}\" the units load: to log in with it, run check --connect as the unit "
                 "runs (docs/operations.md)")


def _cmd_check(args: argparse.Namespace) -> int:
    from .preflight import check_listen, check_paths

    # offline, a secret set nowhere is the systemd credential run will be given (said below);
    # --connect needs it here
    cfg = _load(args, credentials_later=not args.connect)
    if args.log_level is None:  # (check prints its findings; the daemon's info lines would
        configure_logging("warning", cfg.log.format)  # be mixed in with them)
    _warn_exposed(cfg, logged=False)
    problems = check_paths(cfg)  # what run will write: state.dir, file sinks
    listen_problem, listen_note = check_listen(cfg)  # the port run will listen on
    if listen_problem is not None:
        problems.append(listen_problem)
    if problems:
        raise problems[0] if len(problems) == 1 else ConfigErrors(problems)
    notes = [_PENDING_NOTE.format(key=key) for key in cfg.server.pending]
    notes += [listen_note] if listen_note else []
    sinks = {sc.name: build_sink(sc) for sc in cfg.sinks}
    for sink in sinks.values():
        for warning in sink.warnings():
            _err(f"warning: {warning}")
    if not args.connect:
        print("ok")
    for note in notes:
        print(f"note: {note}")
    if not args.connect:
        return EXIT_OK
    code = _run_async(_check_connect(cfg))
    return code if code != EXIT_OK else _run_async(_probe_sinks(sinks, cfg.stream.connect_timeout))


async def _probe_sinks(sinks: dict[str, Sink], timeout: float) -> int:
    """check --connect: each sink that can be tried without sending an event (a database, a
    broker) connects; one line each."""
    import logging

    code = EXIT_OK
    for name, sink in sinks.items():
        logging.disable(logging.CRITICAL)  # a client library's own log lines: the one line is ours
        try:
            async with asyncio.timeout(timeout + 5):
                said = await sink.probe()
        except SinkError as exc:
            _err(str(exc))  # "sink NAME: ..."
            code = EXIT_FATAL
            continue
        except TimeoutError:
            _err(f"sink {name}: no answer in {timeout + 5:g} s")
            code = EXIT_FATAL
            continue
        finally:
            logging.disable(logging.NOTSET)
        if said:
            print(f"ok: sink {name}: {said}")
    return code


async def _check_connect(cfg: Config) -> int:
    """Log in once and wait for the HELLO; report in one line."""
    from .observe.metrics import StreamStats
    from .stream import Session, make_ssl_context

    register_secret(*cfg.server.secret_values())
    hello: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def on_hello(ev: Any) -> None:
        if not hello.done():
            hello.set_result(ev)

    session = Session(cfg.server, cfg.stream, lambda ev: None, StreamStats(),
                      ssl_context=make_ssl_context(cfg.server), on_hello=on_hello)
    task = asyncio.create_task(session.run())
    try:
        done, _ = await asyncio.wait({task, hello}, timeout=cfg.stream.connect_timeout + 5,
                                     return_when=asyncio.FIRST_COMPLETED)
        if hello in done:
            ev = hello.result()
            version = ev.data.get("Version") if isinstance(ev.data, dict) else None
            print(f"ok: logged in to {cfg.server.ws_url} as {cfg.server.username}"
                  + (f" (Comet {version})" if version else ""))
            return await _check_api(cfg)
        if task in done:
            exc = task.exception()
            if isinstance(exc, CredentialsRejected):
                _err(f"{exc} (user {cfg.server.username!r}, {_login_what(cfg)})")
                return EXIT_CREDENTIALS
            _err(f"stream: {exc}" if isinstance(exc, StreamError) else f"stream: {exc!r}")
            return EXIT_FATAL
        _err("stream: logged in but no SEVT_META_HELLO arrived in time")
        return EXIT_FATAL
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _cmd_backfill(args: argparse.Namespace) -> int:
    import time

    from .backfill import parse_when, run_backfill

    cfg = _load(args)
    since = parse_when(args.since, option="--since")
    now = int(time.time())
    if since >= now:
        raise UsageError("--since", f'"{args.since}" is in the future: nothing to backfill')
    until = parse_when(args.until, option="--until") if args.until else now
    register_secret(*cfg.server.secret_values())

    async def go() -> int:
        count = await run_backfill(cfg, since=since, until=until, sink_names=args.sink)
        print(f"backfilled {count} job completions", file=sys.stderr)
        return EXIT_OK

    return _run_async(go())


async def _check_api(cfg: Config) -> int:
    """The admin API with the same credentials (remedial sync needs it)."""
    from .api import AdminClient
    from .stream import make_ssl_context

    if not cfg.resync.enabled:
        return EXIT_OK
    async with AdminClient(cfg.server, ssl_context=make_ssl_context(cfg.server),
                           connect_timeout=cfg.stream.connect_timeout, attempts=1) as api:
        try:
            info = await api.meta_version()
        except ApiError as exc:
            if isinstance(exc, ApiAuthError):
                _err(f"api: {exc} (user {cfg.server.username!r}, {_login_what(cfg)})")
                return EXIT_CREDENTIALS
            _err(f"api: {exc}")
            return EXIT_FATAL
    roles = "" if info.get("AuthenticationRole", True) else \
        " (warning: AuthenticationRole is off: job and account APIs are unavailable)"
    print(f"ok: admin API at {api.base} answers (Comet {info.get('Version', '?')}){roles}")
    return EXIT_OK


def _parse_type_list(text: str) -> frozenset[int]:
    """``--types SEVT_JOB_COMPLETED,4100``: config's rules (names or numbers, a misspelt name is
    an error with a suggestion)."""
    from .config import Section, parse_types

    items: list[Any] = []
    for part in text.split(","):
        part = part.strip()
        if part:
            items.append(int(part) if part.isdigit() else part)
    try:
        types = parse_types(Section({"types": items}, ""), "types")
    except ConfigError as exc:
        raise ConfigError("--types", exc.problem) from None
    assert types is not None
    return types


def _cmd_tap(args: argparse.Namespace) -> int:
    """Connect to the running daemon's tap socket and print the events as they pass."""
    from .tap import open_tap, socket_path

    cfg = load_config_without_secrets(args.config, resolve_sink=resolve_sink_class)
    names = [sc.name for sc in cfg.sinks]
    if args.sink is not None and args.sink not in names:
        _tap_err(f"--sink: {unknown_sink(args.sink, names)}")
        return EXIT_USAGE
    try:
        types = _parse_type_list(args.types) if args.types is not None else None
    except ConfigError as exc:
        _tap_err(str(exc))
        return EXIT_USAGE
    out = sys.stdout
    pretty = out.isatty()
    path = socket_path(cfg.state.dir)
    request = {"sink": args.sink, "types": sorted(types) if types is not None else None,
               "format": "envelope" if pretty else args.format}
    try:
        sock, answer, rest = open_tap(path, request)
    except TapUnavailable as exc:
        _tap_err(f'no running daemon for server "{cfg.server.name}" ({exc})')
        return EXIT_FATAL
    except TapRefused as exc:
        _tap_err(str(exc))
        return EXIT_USAGE
    with sock:
        if pretty:
            what = f"sink {args.sink}" if args.sink else "all events"
            print(f"tapping {answer.get('server', cfg.server.name)} ({what}); Ctrl-C to stop",
                  file=sys.stderr, flush=True)
        return _tap_loop(sock, rest, out=out.buffer, pretty=pretty, count=args.count,
                         colour=pretty and "NO_COLOR" not in os.environ)


def _tap_err(msg: str) -> None:
    print(f"cometstream tap: {scrub(msg)}", file=sys.stderr, flush=True)


def _tap_loop(sock: Any, buf: bytes, *, out: Any, pretty: bool, count: int | None,
              colour: bool) -> int:
    """Print each event line (readable on a terminal, else as received) until ``count``
    events, the daemon's end (exit 1) or Ctrl-C (exit 0, by main)."""
    shown = 0
    try:
        while True:
            lines = buf.split(b"\n")
            buf = lines.pop()
            chunk: list[bytes] = []
            for line in lines:
                if line.startswith(b'{"tap_dropped":'):
                    n = _dropped_count(line)
                    _tap_err(f"{n} events not shown (this tap read too slowly)")
                    continue
                chunk.append(_tap_pretty(line, colour) if pretty else line + b"\n")
                shown += 1
                if count is not None and shown >= count:
                    break
            if chunk:
                out.write(b"".join(chunk))
                out.flush()
            if count is not None and shown >= count:
                return EXIT_OK
            try:
                data = sock.recv(1 << 16)
            except ConnectionError:
                data = b""
            if not data:
                _tap_err("the daemon closed the connection (stopped?)")
                return EXIT_FATAL
            buf += data
    except BrokenPipeError:  # | head: the reader has what it wanted
        _quiet_stdout()  # nothing left to flush at exit
        return EXIT_OK


def _dropped_count(line: bytes) -> int:
    import orjson

    try:
        return int(orjson.loads(line)["tap_dropped"])
    except (ValueError, KeyError, TypeError):
        return 0


def _tap_pretty(line: bytes, colour: bool) -> bytes:
    """An envelope line as the stdout sink shows it on a terminal."""
    from .events import Event, parse_raw
    from .sinks.stdout import pretty_line

    try:
        env = parse_raw(line)
        doc = env["event"]
        ev = Event(line, doc, int(doc.get("Type", 0)), origin=str(env.get("origin", "stream")),
                   received_at=float(env.get("received_at", 0.0)),
                   server=str(env.get("server", "")))
        text = pretty_line(ev, colour=colour)
    except Exception:  # noqa: BLE001 - an event shaped like nothing we know: show it as it came
        text = line.decode("utf-8", "replace")
    return (text + "\n").encode("utf-8", "replace")


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .simulator import run_simulator

    configure_logging("info", "auto")
    try:
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        _err(f"--listen: {exc}")
        return EXIT_USAGE

    async def go() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def ready(url: str) -> None:
            print(f"simulator listening on {url} (user {args.username!r})", file=sys.stderr,
                  flush=True)

        try:
            await run_simulator(host=host, port=port, username=args.username,
                                password=args.password, rate=args.rate, stop=stop,
                                seed=args.seed, ready=ready)
        except OSError as exc:  # (the rule of run and demo: a busy port is a usage error)
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise UsageError("--listen", f"cannot listen on {args.listen}: {why}") from None
        return EXIT_OK

    return _run_async(go())


def _cmd_demo(args: argparse.Namespace) -> int:
    """The simulator and the daemon against it. A busy ``--listen`` port is exit 2, as for
    ``run``'s ``[http] listen``; a closed stdout (``| head``) ends it quietly, exit 0."""
    from .sinks.stdout import StdoutSink

    if args.listen:
        try:
            parse_listen(args.listen)
        except ValueError as exc:
            raise UsageError("--listen", str(exc)) from None
    configure_logging(args.log_level, "auto")

    async def go() -> int:
        from .simulator import Simulator

        stop = asyncio.Event()

        def output_closed() -> None:
            log.info("stdout closed: stopping")
            _quiet_stdout()
            daemon.stop_reason = "stdout closed"
            stop.set()

        sim = Simulator(username=DEMO_USER, password=DEMO_PASSWORD, rate=args.rate, record=False)
        await sim.start("127.0.0.1", 0)
        try:
            with tempfile.TemporaryDirectory(prefix="cometstream-demo-") as state_dir:
                cfg = _demo_config(sim.url, state_dir, args.listen)

                def started() -> None:
                    print(f"demo: simulated Comet Server at {sim.url}, {args.rate:g} events/s, "
                          f"{_demo_metrics(daemon)}; events follow on stdout. Ctrl-C to stop.",
                          file=sys.stderr, flush=True)

                daemon = Daemon(cfg, sinks={"console": StdoutSink("console",
                                                                  on_closed=output_closed)})
                daemon.install_signal_handlers(stop)
                try:
                    await daemon.run(stop, started)
                    return EXIT_OK
                except ConfigError as exc:
                    if exc.key != "http.listen":
                        raise
                    raise UsageError("--listen", f"{exc.problem} (--listen 127.0.0.1:0 picks a "
                                     "free port)") from None
        finally:
            await sim.stop()

    return _run_daemon(go())


def _demo_config(url: str, state_dir: str, listen: str) -> Config:
    return parse_config({
        "server": {"url": url, "name": "demo", "username": DEMO_USER, "password": DEMO_PASSWORD},
        "state": {"dir": state_dir},
        "http": {"listen": listen},
        "fleet": {"enabled": bool(listen)},  # the simulated fleet's cometserver_* on /metrics
        "shutdown": {"timeout": 3.0},
        "sinks": {"console": {"type": "stdout"}},
    }, env={k: v for k, v in os.environ.items() if not k.startswith("COMETSTREAM_")},
        resolve_sink=resolve_sink_class)


def _demo_metrics(daemon: Daemon) -> str:
    if daemon.http is None:
        return "no metrics endpoint"
    return f"metrics on {daemon.http.url}/metrics"


def _quiet_stdout() -> None:
    """stdout's reader is gone: point fd 1 at /dev/null, so that nothing written or flushed
    later (at exit) fails on it."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
