"""``state.dir`` and what keeps it ours: one daemon per directory (:class:`StateLock`), private
files (0600, whatever the umask: they hold usernames and dead letters), no symbolic link
followed where a file of ours goes, and a warning when the directory itself is not private.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from pathlib import Path
from typing import Final

import structlog

from ..errors import LedgerCorrupt, LedgerError

__all__ = ["FILE_MODE", "LOCK_FILE", "StateLock", "check_state_dir", "create_or_check",
           "fsync_path", "remove_private_dir", "tighten"]

LOCK_FILE: Final = "daemon.lock"
#: the mode of every file in ``state.dir`` (the config has no group for them: owner only)
FILE_MODE: Final = 0o600

log = structlog.get_logger("cometstream.ledger")


def create_or_check(path: Path) -> bool:
    """Create ``path`` private (0600, whatever the umask: it holds usernames and dead letters;
    SQLite gives ``-wal`` and ``-shm`` the same mode), or check the file that is there: a
    symbolic link is not followed, and a file that exists with 0 bytes is damaged (a ledger this
    code created is never empty: its first statements write the header). LedgerCorrupt if not
    usable. True if it was created here."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     FILE_MODE)
    except FileExistsError:
        pass
    else:
        os.close(fd)
        return True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LedgerCorrupt("it is a symbolic link (not followed)") from None
        raise LedgerCorrupt(exc.strerror or str(exc)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LedgerCorrupt("it is not a regular file")
        if st.st_size == 0:
            raise LedgerCorrupt("the file is empty (0 bytes)")
        tighten(fd, st)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        _check_side_file(f"{path}{suffix}")
    return False


def _check_side_file(side: str) -> None:
    """A ledger's ``-wal`` or ``-shm``: a link is moved aside, a file of ours made private."""
    with contextlib.suppress(OSError):
        if stat.S_ISLNK(os.lstat(side).st_mode):
            # SQLite refuses to open a database whose -wal or -shm is a link: a link planted
            # there is moved aside (renaming moves the link, never what it points to)
            aside = f"{side}.link-{int(time.time())}"
            os.rename(side, aside)
            log.warning("a symbolic link in the state dir was moved aside (not followed)",
                        path=side, moved_to=aside)
            return
    with contextlib.suppress(OSError):
        fd = os.open(side, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            tighten(fd, os.fstat(fd))
        finally:
            os.close(fd)


def tighten(fd: int, st: os.stat_result) -> None:
    """A file of ours readable by others (restored from a backup, an earlier version's) is
    made private; one of another user is left as it is (``check_state_dir`` warns)."""
    if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077 and st.st_uid == os.geteuid():
        with contextlib.suppress(OSError):
            os.fchmod(fd, FILE_MODE)


def check_state_dir(directory: Path) -> list[str]:
    """Warnings about ``state.dir`` (logged at start): writable by others, or owned by another
    user (who could then replace the ledger, or plant a symbolic link where a file goes)."""
    try:
        st = os.stat(directory)
    except OSError:
        return []
    problems = []
    if st.st_mode & 0o022:
        who = "everyone" if st.st_mode & 0o002 else "its group"
        problems.append(f"{directory} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}): "
                        "another user could replace or redirect the daemon's files; use 0700 "
                        "or 0750")
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        problems.append(f"{directory} is owned by uid {st.st_uid}, not by this process "
                        f"(uid {os.geteuid()}): that user can replace the daemon's files")
    for text in problems:
        log.warning("state.dir is not private", problem=text)
    return problems


class StateLock:
    """An exclusive lock on ``state.dir`` for the daemon's lifetime (``daemon.lock``, holding
    its PID). The tools (``dlq``, ``tap``, ``backfill``) do not take it."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.path = directory / LOCK_FILE
        self._fd = -1

    def acquire(self) -> None:
        """Raises LedgerError naming the directory and the PID that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                     FILE_MODE)
        try:
            tighten(fd, os.fstat(fd))
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LedgerError(f"{self.dir} is in use by another cometstream daemon "
                              f"(pid {holder})") from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


def remove_private_dir(path: Path) -> None:
    """A migration's private directory and what is in it (files only; never follows a link)."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(OSError):
            os.unlink(path)  # (an earlier version's ledger.db.migrating file)
        for suffix in ("-wal", "-shm", "-journal"):
            with contextlib.suppress(OSError):
                os.unlink(f"{path}{suffix}")
        return
    if st.st_uid != os.geteuid():
        return  # not ours: left alone
    with contextlib.suppress(OSError):
        for name in os.listdir(path):
            with contextlib.suppress(OSError):
                os.unlink(path / name)
        os.rmdir(path)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
