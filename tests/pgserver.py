"""A private PostgreSQL server for the tests and the benchmarks: ``initdb`` into a temporary
directory and ``pg_ctl start`` on a free 127.0.0.1 port, run as the ``postgres`` user when we
are root (initdb refuses root), password authentication (scram-sha-256), stopped and removed on
exit. Debian keeps the server binaries off ``PATH``: ``pg_config --bindir`` names them, else
the newest ``/usr/lib/postgresql/*/bin``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PG_PASSWORD", "PG_USER", "Pg", "bindir", "private_postgres"]

PG_USER = "cometstream"
PG_PASSWORD = "pg-s3cret-pw"


def bindir() -> Path | None:
    """Where initdb and pg_ctl are, or None."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True,
                        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                             check=True).stdout.strip()
        candidates.insert(0, Path(out))
    except (OSError, subprocess.CalledProcessError):
        pass
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Pg:
    bindir: Path
    data: Path
    port: int
    run_as: list[str]

    @property
    def dsn(self) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/postgres"

    def ctl(self, *args: str) -> None:
        subprocess.run([*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.data),
                        "-w", "-l", str(self.data.parent / "log"), *args],
                       check=True, capture_output=True)

    def start(self) -> None:
        self.ctl("-o", f"-p {self.port} -k {self.data.parent} -c listen_addresses=127.0.0.1 "
                 "-c fsync=off", "start")

    def stop(self) -> None:
        self.ctl("-m", "fast", "stop")

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.dsn, password=PG_PASSWORD, autocommit=True) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description is not None else []


@contextmanager
def private_postgres(where: Path) -> Iterator[Pg]:
    """A running private server while the block runs (``where``/bin must hold initdb)."""
    run_as: list[str] = []
    top = Path(tempfile.mkdtemp(prefix="cometstream-pg-"))
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        run_as = ["runuser", "-u", "postgres", "--"]
        shutil.chown(top, "postgres", "postgres")
    pwfile = top / "pw"
    pwfile.write_text(PG_PASSWORD + "\n")
    if run_as:
        shutil.chown(pwfile, "postgres", "postgres")
    data = top / "data"
    subprocess.run([*run_as, str(where / "initdb"), "-D", str(data), "-U", PG_USER,
                    "--pwfile", str(pwfile), "-A", "scram-sha-256", "--no-sync"],
                   check=True, capture_output=True)
    server = Pg(where, data, _free_port(), run_as)
    server.start()
    try:
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(top, ignore_errors=True)
