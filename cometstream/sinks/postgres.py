"""The PostgreSQL sink: events and jobs as rows, for reports in SQL (``docs/reporting.md``).

Options (``[sinks.NAME]``, ``type = "postgres"``; needs the ``postgres`` extra, psycopg 3):

- ``dsn`` (required): a libpq URL (``postgresql://user@host:5432/db?sslmode=verify-full``) or
  conninfo (``host=db user=comet dbname=reports``): TLS, ``service`` and ``PG*`` variables work
  as in ``psql``. A password in it is refused: use ``password_file``, ``PGPASSWORD`` or a pgpass
  file (libpq's own).
- ``password_file``: the password, read like every ``*_file`` secret (the final line break is
  not part of it); masked in logs. Without it, the systemd credential ``NAME.password`` when
  the unit loads one, else libpq's own ``PGPASSWORD`` or pgpass file.
- ``schema`` (default ``public``) and ``table_prefix`` (default ``cometstream_``): where the two
  tables go (lower-case letters, digits and ``_``).
- ``batch`` (default 1024, 1 to 10000): events per transaction at most (the pipeline hands a
  sink at most 1024 at once).
- ``connect_timeout`` (default 10 seconds).

At ``open`` the sink creates, if missing, ``<prefix>events``, ``<prefix>jobs``,
``<prefix>devices``, their indexes and ``<prefix>meta`` (the schema version), and upgrades older
tables in place (additive steps, see :func:`_migrations`); it never drops or rewrites.

Each ``send`` is one transaction: every event goes into ``events`` once (``UNIQUE (server,
event_key)``, ``ON CONFLICT DO NOTHING``), and each job event is upserted into ``jobs`` (a
late or replayed ``JOB_NEW`` never turns a finished job back to running). Replays after a crash
or a resync therefore change nothing. An event PostgreSQL refuses (a ``\\u0000`` in a string,
which ``jsonb`` cannot hold) is found by halving the batch: the events before it are committed,
it alone is refused (dead-lettered, bytes intact), the rest follow. The database down,
restarting or refusing the password is a failure of the sink: the events wait in the ledger.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import structlog

from ..config import is_loopback
from ..errors import SinkError
from ..events import JOB_COMPLETED, JOB_TYPES
from ..section import Section
from .base import Sink

if TYPE_CHECKING:
    from typing import Self

    import psycopg

    from ..events import Event

__all__ = ["SCHEMA_VERSION", "PostgresSink", "event_key"]

log = structlog.get_logger("cometstream.sinks.postgres")

SCHEMA_VERSION: Final = 2
DEFAULT_BATCH: Final = 1024  # what the pipeline hands a sink at most at once
BATCH_LIMIT: Final = 10_000
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")
SUCCESS: Final = 5000  # JOB_STATUS_FINISHED_SUCCESS
BACKUP: Final = 4001  # JOB_CLASSIFICATION_BACKUP
#: events per statement: the server works on one chunk while the next is built
_CHUNK: Final = 256


def event_key(ev: Event) -> str:
    """The identity of an event in ``events``: its dedup key (``4201:<GUID>:<EndTime>``...) for
    job events, else ``h:`` and the SHA-256 of its arrival time and bytes (two byte-identical
    logins in one second are two events; a replay of the same arrival is the same one)."""
    dk = ev.dedup_key()
    if dk is not None:
        return dk
    h = hashlib.sha256(repr(ev.received_at).encode() + b"\0" + ev.raw)
    return "h:" + h.hexdigest()[:40]


#: the first second of the year 10000: times from then on are not times (NULL)
_YEAR_10000: Final = 253_402_300_800


def _epoch(value: object) -> float | None:
    """Unix seconds for ``to_timestamp``; 0, absent, not a number or past the year 9999 → NULL
    (a running job's end)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not \
            0 < value < _YEAR_10000:
        return None
    return float(value)


def _int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**63:
        return None
    return value


def _int32(value: object) -> int | None:
    """A status or classification code for an ``integer`` column (another number: NULL)."""
    v = _int(value)
    return v if v is not None and -(2**31) <= v < 2**31 else None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _ddl(schema: str, p: str) -> list[str]:
    s = f'"{schema}"'
    return [
        f"CREATE SCHEMA IF NOT EXISTS {s}",
        f"""CREATE TABLE IF NOT EXISTS {s}.{p}meta (
            name text PRIMARY KEY, value text NOT NULL)""",
        f"""CREATE TABLE IF NOT EXISTS {s}.{p}events (
            id bigserial PRIMARY KEY,
            server text NOT NULL,
            event_key text NOT NULL,
            type integer NOT NULL,
            type_name text NOT NULL,
            actor text,
            resource_id text,
            event_time timestamptz,
            received_at timestamptz NOT NULL,
            origin text NOT NULL,
            event jsonb NOT NULL,
            UNIQUE (server, event_key))""",
        f"CREATE INDEX IF NOT EXISTS {p}events_time ON {s}.{p}events (event_time)",
        f"CREATE INDEX IF NOT EXISTS {p}events_type ON {s}.{p}events (type, event_time)",
        f"""CREATE TABLE IF NOT EXISTS {s}.{p}jobs (
            server text NOT NULL,
            job_id text NOT NULL,
            username text,
            device_id text,
            source_guid text,
            classification integer,
            status integer,
            status_name text,
            start_time timestamptz,
            end_time timestamptz,
            total_size bigint,
            upload_size bigint,
            download_size bigint,
            total_files bigint,
            total_directories bigint,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (server, job_id))""",
        f"CREATE INDEX IF NOT EXISTS {p}jobs_end ON {s}.{p}jobs (end_time)",
        f"CREATE INDEX IF NOT EXISTS {p}jobs_user ON {s}.{p}jobs (username, end_time)",
    ]


def _migrations(schema: str, p: str) -> dict[int, list[str]]:
    """What brings the tables from the version before to each version: additive only (never a
    drop, never a rewrite), run in the transaction that records the new version."""
    t = f'"{schema}".{p}'
    return {
        # one row per device: its last job, last success, last status (the report of devices
        # without a recent backup reads this instead of aggregating every job), filled from
        # the jobs already there
        2: [f"""CREATE TABLE IF NOT EXISTS {t}devices (
                server text NOT NULL,
                username text NOT NULL,
                device_id text NOT NULL,
                last_start timestamptz,
                last_end timestamptz,
                last_success timestamptz,
                last_status integer,
                PRIMARY KEY (server, username, device_id))""",
            f"""INSERT INTO {t}devices AS d
                SELECT server, username, device_id, max(start_time), max(end_time),
                       max(end_time) FILTER (WHERE status = {SUCCESS} AND
                                             classification = {BACKUP}),
                       (array_agg(status ORDER BY end_time DESC)
                            FILTER (WHERE end_time IS NOT NULL))[1]
                FROM {t}jobs WHERE username IS NOT NULL AND device_id IS NOT NULL
                GROUP BY server, username, device_id
                ON CONFLICT (server, username, device_id) DO NOTHING"""],
    }


class PostgresSink(Sink):
    """Events into ``<prefix>events``, jobs upserted into ``<prefix>jobs``; one transaction per
    batch (see the module docstring)."""

    default_format = "event"

    def __init__(self, name: str, *, dsn: str, password: str | None = None,
                 schema: str = "public", table_prefix: str = "cometstream_",
                 batch: int = DEFAULT_BATCH,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        self.name = name
        self.dsn = dsn
        self._password = password
        self.schema = schema
        self.prefix = table_prefix
        self.max_batch = batch
        self.connect_timeout = connect_timeout
        self._conn: psycopg.AsyncConnection[Any] | None = None
        t = f'"{schema}".{table_prefix}'
        # one statement per table per batch: the rows go as one array per column (unnest), in
        # binary (%b: a JSON text array in text format costs the server ~30 times more to
        # parse), one round trip whatever the batch's size, and no prepared statement or
        # temporary table (both would break behind a transaction-pooling PgBouncer)
        self._sql_event = (
            f"INSERT INTO {t}events (server, event_key, type, type_name, actor, resource_id, "
            "event_time, received_at, origin, event) "
            "SELECT s, k, ty, tn, a, r, to_timestamp(et), to_timestamp(ra), o, e::jsonb "
            "FROM unnest(%b::text[], %b::text[], %b::int[], %b::text[], %b::text[], %b::text[], "
            "%b::float8[], %b::float8[], %b::text[], %b::text[]) "
            "AS u(s, k, ty, tn, a, r, et, ra, o, e) "
            "ON CONFLICT (server, event_key) DO NOTHING")
        cols = ("username", "device_id", "source_guid", "classification", "status",
                "status_name", "start_time", "end_time", "total_size", "upload_size",
                "download_size", "total_files", "total_directories")
        types = ("text", "text", "text", "int", "int", "text", "float8", "float8", "bigint",
                 "bigint", "bigint", "bigint", "bigint")
        values = ", ".join(f"to_timestamp(u.{c})" if c.endswith("_time") else f"u.{c}"
                           for c in cols)
        # a completion (end_time set) always wins; a start only updates a job still running; a
        # replay that changes nothing leaves the row alone (updated_at too)
        self._sql_job = (
            f"INSERT INTO {t}jobs AS j (server, job_id, {', '.join(cols)}) "
            f"SELECT u.server, u.job_id, {values} "
            f"FROM unnest(%b::text[], %b::text[], {', '.join(f'%b::{ty}[]' for ty in types)}) "
            f"AS u(server, job_id, {', '.join(cols)}) "
            "ON CONFLICT (server, job_id) DO UPDATE SET "
            + ", ".join(f"{c} = EXCLUDED.{c}" for c in cols)
            + ", updated_at = now() "
            "WHERE (EXCLUDED.end_time IS NOT NULL OR j.end_time IS NULL) AND "
            f"({', '.join('j.' + c for c in cols)}) IS DISTINCT FROM "
            f"({', '.join('EXCLUDED.' + c for c in cols)})")
        # times only move forward (GREATEST skips NULLs): replays and reordering change nothing
        self._sql_device = (
            f"INSERT INTO {t}devices AS d (server, username, device_id, last_start, last_end, "
            "last_success, last_status) "
            "SELECT u.server, u.username, u.device_id, to_timestamp(u.ls), to_timestamp(u.le), "
            "to_timestamp(u.lsu), u.st "
            "FROM unnest(%b::text[], %b::text[], %b::text[], %b::float8[], %b::float8[], "
            "%b::float8[], %b::int[]) AS u(server, username, device_id, ls, le, lsu, st) "
            "ON CONFLICT (server, username, device_id) DO UPDATE SET "
            "last_start = GREATEST(d.last_start, EXCLUDED.last_start), "
            "last_end = GREATEST(d.last_end, EXCLUDED.last_end), "
            "last_success = GREATEST(d.last_success, EXCLUDED.last_success), "
            "last_status = CASE WHEN EXCLUDED.last_end >= d.last_end OR d.last_end IS NULL "
            "THEN coalesce(EXCLUDED.last_status, d.last_status) ELSE d.last_status END")

    @classmethod
    def from_config(cls, name: str, options: Section) -> Self:
        import psycopg.conninfo

        dsn = options.str("dsn", required=True, allow_empty=False)
        try:
            parts = psycopg.conninfo.conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as exc:
            raise options.error("dsn", f"not a libpq URL or conninfo: {exc}") from None
        if parts.get("password"):
            raise options.error("dsn", "holds a password: put it in password_file, PGPASSWORD "
                                "or a pgpass file, where it is kept out of logs")
        options.str("format", cls.default_format)  # always present; rows hold the event itself
        schema = options.str("schema", "public")
        prefix = options.str("table_prefix", "cometstream_")
        for key, value in (("schema", schema), ("table_prefix", prefix)):
            if not _IDENT.match(value) or len(value) > 40:
                raise options.error(key, "expected lower-case letters, digits and _ "
                                    f"(at most 40, not starting with a digit), got {value!r}")
        batch = options.int("batch", DEFAULT_BATCH, min=1, max=BATCH_LIMIT)
        timeout = options.float("connect_timeout", DEFAULT_CONNECT_TIMEOUT, min=0, max=3600,
                                min_exclusive=True)
        from ..config import read_credential, read_secret_file

        secret = read_secret_file(options, "password_file")
        if secret is None:  # a unit's LoadCredentialEncrypted=NAME.password:...
            secret = read_credential(options, f"{name}.password", option="password_file")
        options.done()
        return cls(name, dsn=dsn, password=secret.reveal() if secret is not None else None,
                   schema=schema, table_prefix=prefix, batch=batch, connect_timeout=timeout)

    # --- TLS -----------------------------------------------------------------------------------
    def _tls(self) -> tuple[dict[str, str], str | None]:
        """What the connection adds to the DSN for TLS, and a warning (or None). A host other
        than this machine is verified by default (``sslmode=verify-full``, the system's CAs
        unless ``sslrootcert`` or libpq's ``~/.postgresql/root.crt`` says otherwise); an
        ``sslmode`` in the DSN or ``PGSSLMODE`` is the operator's choice and wins, with a
        warning when it does not verify a remote host."""
        import psycopg.conninfo

        parts = psycopg.conninfo.conninfo_to_dict(self.dsn)
        hosts = [h.strip() for h in str(parts.get("host") or os.environ.get("PGHOST") or
                                        "").split(",")]
        remote = [h for h in hosts if not _is_local(h)]
        if not remote:
            return {}, None
        mode = str(parts.get("sslmode") or os.environ.get("PGSSLMODE") or "")
        where = ", ".join(remote)
        if not mode:
            extra = {"sslmode": "verify-full"}
            if not (parts.get("sslrootcert") or os.environ.get("PGSSLROOTCERT") or
                    (Path.home() / ".postgresql" / "root.crt").exists()):
                extra["sslrootcert"] = "system"
            return extra, None
        if mode == "verify-full":
            return {}, None
        what = ("without TLS" if mode == "disable" else
                "with TLS only if the server offers it, unverified" if mode in ("allow", "prefer")
                else "with TLS but without checking the server's certificate"
                if mode == "require" else "with TLS, its certificate checked but not its name")
        return {}, (f"sinks.{self.name}.dsn: sslmode={mode}: {where} is reached {what}; "
                    "the events and the password cross the network where others may read or "
                    "alter them (sslmode=verify-full checks the server)")

    def warnings(self) -> list[str]:
        return [w] if (w := self._tls()[1]) else []

    async def probe(self) -> str | None:
        import psycopg

        conn = await self._connect()
        try:
            cur = await conn.execute("SELECT current_user, current_database(), "
                                     "current_setting('server_version'), to_regclass(%s)",
                                     (f'"{self.schema}".{self.prefix}meta',))
            user, db, version, meta = await cur.fetchone() or ("?", "?", "?", None)
            tables = f"the tables will be created in schema {self.schema}"
            if meta is not None:
                cur = await conn.execute(f"SELECT value FROM {meta} "
                                         "WHERE name = 'schema_version'")
                got = await cur.fetchone()
                tables = f"its tables at schema version {got[0] if got else '?'}"
            tls = "TLS" if conn.pgconn.ssl_in_use else "no TLS"
        except psycopg.Error as exc:
            raise SinkError(self.name, f"PostgreSQL failed: {_describe(exc)}") from exc
        finally:
            await conn.close()
        return f"PostgreSQL {version}, database {db} as {user} ({tls}); {tables}"

    # --- connection ----------------------------------------------------------------------------
    async def open(self) -> None:
        if self._conn is not None and not self._conn.closed:
            return
        import psycopg

        conn = await self._connect()
        try:
            await self._migrate(conn)
        except psycopg.Error as exc:
            await conn.close()
            raise SinkError(self.name, f"cannot create the tables: {_describe(exc)}",
                            retryable=True, sink_wide=True) from exc
        self._conn = conn

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        import psycopg

        if self._password:
            from ..observe.logging import register_secret

            register_secret(self._password)
        kwargs: dict[str, Any] = {"connect_timeout": max(1, round(self.connect_timeout)),
                                  **self._tls()[0]}
        if self._password is not None:
            kwargs["password"] = self._password
        try:
            # prepare_threshold=None: no server-side prepared statements, so a transaction-
            # pooling PgBouncer in front of the database is safe
            return await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, prepare_threshold=None,
                application_name=f"cometstream/{self.name}", **kwargs)
        except psycopg.Error as exc:
            raise SinkError(self.name, f"cannot connect to PostgreSQL: {_describe(exc)}",
                            retryable=True, sink_wide=True) from exc

    async def _migrate(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Create what is missing and bring the tables to :data:`SCHEMA_VERSION`, in one
        transaction, one sink at a time (an advisory lock: two daemons starting on the same
        database do not both migrate). Tables of a newer version are used as they are (their
        changes are additive): an older cometstream after a rollback goes on writing."""
        meta = f'"{self.schema}".{self.prefix}meta'
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                               (f"cometstream:{self.schema}.{self.prefix}",))
            for stmt in _ddl(self.schema, self.prefix):
                await conn.execute(stmt)
            cur = await conn.execute(f"INSERT INTO {meta} (name, value) VALUES "
                                     "('schema_version', '1') ON CONFLICT (name) DO NOTHING "
                                     "RETURNING value")
            fresh = await cur.fetchone() is not None  # (no version before: made just now)
            cur = await conn.execute(f"SELECT value FROM {meta} WHERE name = 'schema_version'")
            row = await cur.fetchone()
            version = int(row[0]) if row is not None and str(row[0]).isdigit() else 1
            if version > SCHEMA_VERSION:
                log.warning("postgres tables are of a newer cometstream: used as they are",
                            sink=self.name, tables_version=version, known=SCHEMA_VERSION)
                return
            steps = _migrations(self.schema, self.prefix)
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for stmt in steps[step]:
                    await conn.execute(stmt)
            if version < SCHEMA_VERSION:
                await conn.execute(f"UPDATE {meta} SET value = %s WHERE name = 'schema_version'",
                                   (str(SCHEMA_VERSION),))
                if fresh:
                    log.info("postgres tables created", sink=self.name, version=SCHEMA_VERSION)
                else:
                    log.info("postgres tables upgraded", sink=self.name, tables_version=version,
                             now=SCHEMA_VERSION)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    # --- sending -------------------------------------------------------------------------------
    async def send(self, batch: Sequence[Event]) -> None:
        import psycopg

        accepted = 0
        window = min(len(batch), self.max_batch)
        while accepted < len(batch):
            part = batch[accepted:accepted + window]
            if self._conn is None or self._conn.closed:
                await self._reset()
                try:
                    await self.open()
                except SinkError as exc:
                    exc.accepted = accepted
                    raise
            try:
                await self._write(part)
            except (psycopg.DataError, UnicodeEncodeError) as exc:  # a NUL, a lone surrogate
                if len(part) > 1:  # find the refused event: the head before it goes in
                    window = len(part) // 2
                    continue
                raise SinkError(self.name, f"PostgreSQL refused the event: {_describe(exc)}",
                                retryable=False, accepted=accepted, failed=1) from exc
            except psycopg.Error as exc:
                await self._reset()
                raise SinkError(self.name, f"PostgreSQL failed: {_describe(exc)}",
                                retryable=True, accepted=accepted, sink_wide=True) from exc
            accepted += len(part)
            window = min(len(batch) - accepted, self.max_batch)

    async def _reset(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except Exception as exc:  # noqa: BLE001 - a broken connection thrown away
                log.debug("discarded postgres connection failed to close", error=_describe(exc))

    async def _write(self, part: Sequence[Event]) -> None:
        """One transaction; in pipeline mode the statements of each chunk go out as soon as
        they are built, so the server works on one chunk while the next one is built."""
        assert self._conn is not None
        async with self._conn.pipeline(), self._conn.transaction(), \
                self._conn.cursor() as cur:
            for start in range(0, len(part), _CHUNK):
                events, jobs = self._rows(part[start:start + _CHUNK])
                await cur.execute(self._sql_event, _columns(events, 10))
                if jobs:
                    await cur.execute(self._sql_job, _columns(jobs, 15))
                    devices = _devices(jobs)
                    if devices:
                        await cur.execute(self._sql_device, _columns(devices, 7))

    def _rows(self, chunk: Sequence[Event]) -> tuple[list[tuple[Any, ...]],
                                                     list[tuple[Any, ...]]]:
        """The chunk's rows for events and jobs, each key once (one statement may not touch a
        row twice): the last event of a key wins, and a completion over a start."""
        events: dict[tuple[str, str], tuple[Any, ...]] = {}
        jobs: dict[tuple[str, str], tuple[bool, tuple[Any, ...]]] = {}
        for ev in chunk:
            key = event_key(ev)
            events[(ev.server, key)] = self._event_row(ev, key)  # last wins
            row = self._job_row(ev)
            if row is not None:
                done = row[9] is not None
                prev = jobs.get((row[0], row[1]))
                if prev is None or done or not prev[0]:  # a completion is never undone
                    jobs[(row[0], row[1])] = (done, row)
        return list(events.values()), [r for _, r in jobs.values()]

    @staticmethod
    def _event_row(ev: Event, key: str) -> tuple[Any, ...]:
        doc = ev.doc
        return (ev.server, key, ev.type, ev.type_name, _text(doc.get("Actor")),
                _text(doc.get("ResourceID")), _epoch(ev.timestamp),
                ev.received_at, ev.origin,
                ev.raw.decode("utf-8", "surrogateescape"))

    @staticmethod
    def _job_row(ev: Event) -> tuple[Any, ...] | None:
        if ev.type not in JOB_TYPES:
            return None
        job = ev.job
        if job is None:
            return None
        guid = job.get("GUID")
        if not isinstance(guid, str) or not guid:
            return None
        from ..constants import job_status_name

        status = _int32(job.get("Status"))
        end = _epoch(job.get("EndTime")) if ev.type == JOB_COMPLETED else None
        return (ev.server, guid, _text(job.get("Username")), _text(job.get("DeviceID")),
                _text(job.get("SourceGUID")), _int32(job.get("Classification")), status,
                job_status_name(status) if status is not None else None,
                _epoch(job.get("StartTime")), end,
                _int(job.get("TotalSize")), _int(job.get("UploadSize")),
                _int(job.get("DownloadSize")), _int(job.get("TotalFiles")),
                _int(job.get("TotalDirectories")))


def _is_local(host: str) -> bool:
    """A Unix socket (a path, or none: libpq's default) or a loopback name or address."""
    return not host or host.startswith(("/", "@")) or is_loopback(host)


def _devices(jobs: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Job rows folded into one row per device: latest start, end, successful backup end,
    and the status of the job that ended last."""
    found: dict[tuple[str, str, str], list[Any]] = {}
    for (server, _, user, device, _, classification, status, _, start, end, *_) in jobs:
        if user is None or device is None:
            continue
        d = found.setdefault((server, user, device), [None, None, None, None])
        if start is not None and (d[0] is None or start > d[0]):
            d[0] = start
        if end is not None:
            if d[1] is None or end >= d[1]:
                d[1], d[3] = end, status
            if status == SUCCESS and classification == BACKUP and (d[2] is None or end > d[2]):
                d[2] = end
    return [(*key, *vals) for key, vals in found.items()]


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as one list per column (the statements' arrays)."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(col) for col in zip(*rows, strict=True)]


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
