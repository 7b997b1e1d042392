"""Migration of the files of versions before the ledger (``spool.db`` and ``checkpoint.json``)
into a new ledger, at the first start. If that fails, they are left as they were and the
daemon says so and exits.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Final

import structlog

from ..errors import LedgerCorrupt, LedgerError
from .legacy import read_checkpoint
from .schema import FILENAME, connect, quarantine, transaction, upsert_meta
from .statedb import write_state
from .statedir import FILE_MODE, fsync_path, remove_private_dir

__all__ = ["LEGACY_CHECKPOINT", "LEGACY_SPOOL", "migrate"]

#: the files of versions before the ledger, migrated into it at the first start
LEGACY_SPOOL: Final = "spool.db"
LEGACY_CHECKPOINT: Final = "checkpoint.json"

log = structlog.get_logger("cometstream.ledger")


def migrate(directory: Path, server: str) -> bool:
    """Build ``ledger.db`` from ``spool.db`` and ``checkpoint.json`` if there is no ledger yet
    and either exists. True if it did. On failure (LedgerError) the old files are untouched."""
    target = directory / FILENAME
    old_spool = directory / LEGACY_SPOOL
    old_cp = directory / LEGACY_CHECKPOINT
    if target.exists() or not (old_spool.exists() or old_cp.exists()):
        return False
    # built in a private directory (0700, a new random name): nobody else can plant a file or a
    # symbolic link where it is written, whatever the state dir's mode
    for stale in directory.glob(f"{FILENAME}.migrating*"):  # a migration a crash interrupted
        remove_private_dir(stale)
    tmp_dir: Path | None = None
    quarantined = None
    had_spool = old_spool.exists()
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f"{FILENAME}.migrating-", dir=directory))
        tmp = tmp_dir / FILENAME
        state = read_checkpoint(old_cp, server) if old_cp.exists() else None
        if old_spool.exists():
            try:
                _copy_spool(old_spool, tmp)
            except LedgerCorrupt as exc:
                quarantined = quarantine(old_spool, str(exc))
        db = connect(tmp, upgrade=True)
        try:
            def fill() -> None:
                if state is not None:
                    write_state(db, state)
                upsert_meta(db, {"server": server})
            transaction(db, fill)
        finally:
            db.close()
        os.chmod(tmp, FILE_MODE)
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_path(directory)
        remove_private_dir(tmp_dir)
    except (OSError, sqlite3.Error, LedgerCorrupt, LedgerError) as exc:
        # (LedgerError: connect() on a file that is not damaged but cannot be opened, e.g. a
        # full disk that has no room for the WAL: the same failure, the same cleanup)
        if tmp_dir is not None:
            remove_private_dir(tmp_dir)
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise LedgerError(f"migrating {LEGACY_SPOOL} and {LEGACY_CHECKPOINT} in {directory} "
                          f"into {FILENAME} failed ({why}); the old files are left as they "
                          "were") from None
    for path in (old_cp, old_spool, Path(f"{old_spool}-wal"), Path(f"{old_spool}-shm")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    log.info("state migrated into the ledger", path=str(target),
             checkpoint=state is not None, spool=had_spool and quarantined is None,
             dedup_keys=len(state.dedup) if state else 0)
    return True


def _copy_spool(old_spool: Path, tmp: Path) -> None:
    """An earlier version's spool, copied whole into a new private file (LedgerCorrupt: it is
    damaged, and nothing was copied)."""
    src = connect(old_spool, check=True, upgrade=False)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                         | os.O_NOFOLLOW, FILE_MODE))
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()
