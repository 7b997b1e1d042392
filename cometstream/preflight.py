"""What ``cometstream check`` verifies beyond the configuration's syntax: that the places
``run`` writes to can be created and written, and that its port can be bound.

- ``state.dir``: a directory (created with its parents if missing) the daemon can write in;
- each file sink's ``path`` and each sink's ``dead_letter``: a file that can be created (its
  folder too) or appended to;
- ``[http] listen``: an address this machine has and a port nobody else holds (the running
  daemon of the same ``state.dir`` may: that is fine, and said).

The answer is for the user running ``check`` (the units run the daemon as their own dynamic
user: as root, ``check`` cannot see what that user may write). ``run`` uses the same words when
``state.dir`` fails at start: "not a directory", never the system's "File exists".
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
from pathlib import Path

from .config import Config, parse_listen
from .errors import ConfigError
from .store import LOCK_FILE

__all__ = ["check_listen", "check_paths", "dir_problem", "file_problem", "running_daemon"]


def _existing(path: Path) -> tuple[Path, os.stat_result]:
    """``path`` or its nearest ancestor that exists, with its stat (a symbolic link that
    leads nowhere counts as existing: it is in the way)."""
    p = path
    while True:
        try:
            return p, p.stat()
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
        try:
            return p, p.lstat()
        except (FileNotFoundError, NotADirectoryError):
            pass
        if p.parent == p:
            raise FileNotFoundError(errno.ENOENT, "no such file or directory", str(path))
        p = p.parent


def _dir_blocker(path: Path) -> tuple[Path, str] | None:
    """What stops ``path`` from being used as a directory: (the path at fault, why)."""
    try:
        found, st = _existing(path)
    except OSError as exc:
        return path, f"cannot be used ({exc.strerror or exc})"
    if not stat.S_ISDIR(st.st_mode):
        return found, "is not a directory"
    if not os.access(found, os.W_OK | os.X_OK):
        return found, "is not writable"
    return None


def dir_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as a directory (created with its parents if missing, then
    written in), in one phrase; None if it can."""
    blocker = _dir_blocker(path)
    if blocker is None:
        return None
    at, why = blocker
    return f"{at} {why}" if at == path else f"cannot create {path}: {at} {why}"


def file_problem(path: Path) -> str | None:
    """Why a file cannot be created or appended to at ``path`` (its folder created if
    missing), in one phrase; None if it can."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        blocker = _dir_blocker(path.parent)
        return None if blocker is None else f"cannot create {path}: {blocker[0]} {blocker[1]}"
    except OSError as exc:
        return f"{path} cannot be used ({exc.strerror or exc})"
    if stat.S_ISDIR(st.st_mode):
        return f"{path} is a directory"
    if not os.access(path, os.W_OK):
        return f"{path} is not writable"
    return None


def _not_writable_fix(problem: str, *, sink: bool) -> str:
    """What to do about a place this user may not write, and (a sink) why run starts anyway."""
    if not problem.endswith("is not writable"):
        return problem
    problem += f" by uid {os.getuid()}: give the user cometstream runs as write access, or " \
        "choose another path"
    if sink:  # (run waits for a sink to come back, rather than refuse to start)
        problem += "; run would start anyway and keep this sink's events in the ledger, with " \
            "/readyz 503, until it can write"
    return problem


def check_paths(cfg: Config) -> list[ConfigError]:
    """One error per place ``run`` could not write, naming its key."""
    errors = []
    problem = dir_problem(cfg.state.dir)
    if problem is not None:
        errors.append(ConfigError("state.dir", _not_writable_fix(problem, sink=False)))
    for sc in cfg.sinks:
        paths = []
        if sc.type == "file":
            paths.append(("path", sc.section().path("path")))
        paths.append(("dead_letter", sc.dead_letter))
        for key, path in paths:
            if path is None:
                continue
            problem = file_problem(path)
            if problem is None and sc.type == "file" and key == "path":
                from .sinks.file import refused  # (run's own tests of the sink's file)

                why = refused(path)
                if why is not None:
                    problem = (f"{path} {why}; run would start anyway and keep this sink's "
                               "events in the ledger, with /readyz 503, until the path is "
                               "fixed")
            if problem is not None:
                errors.append(ConfigError(f"sinks.{sc.name}.{key}",
                                          _not_writable_fix(problem, sink=True)))
    return errors


def running_daemon(state_dir: Path) -> str | None:
    """The PID of the daemon that holds ``state.dir`` (its ``daemon.lock``), or None when no
    daemon runs there. Creates nothing."""
    try:
        fd = os.open(state_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _listen_problem(listen: str) -> tuple[int, str] | None:
    """Why ``run`` could not listen on ``listen`` (bound as the daemon binds it: every address
    the host has, SO_REUSEADDR, IPv6 only on IPv6), as (errno, phrase); None if it could."""
    host, port = parse_listen(listen)
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return 0, f"cannot listen on {listen}: {exc.strerror}: give an address of this machine"
    for family, type_, proto, _name, addr in infos:
        with socket.socket(family, type_, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(addr)
            except OSError as exc:
                why = os.strerror(exc.errno) if exc.errno else str(exc)
                return exc.errno or 0, f"cannot listen on {listen}: {why}"
    return None


def check_listen(cfg: Config) -> tuple[ConfigError | None, str | None]:
    """``[http] listen``, bound and let go: (the problem, a note). A port held by the daemon
    that runs on this ``state.dir`` is no problem (note: it is in use by that daemon)."""
    listen = cfg.http.listen
    if not listen:
        return None, None
    found = _listen_problem(listen)
    if found is None:
        return None, None
    code, problem = found
    if code == errno.EADDRINUSE:
        pid = running_daemon(cfg.state.dir)
        if pid is not None:
            return None, (f"http.listen: {listen} is in use by the daemon running on this "
                          f"state.dir (pid {pid})")
        port = listen.rpartition(":")[2]
        problem += (f": another program listens there (ss -ltnp 'sport = :{port}' names it); "
                    "stop it or choose another port")
    elif code == errno.EADDRNOTAVAIL:
        problem += ": that address is not one of this machine's"
    elif code == errno.EACCES:
        problem += ": a port below 1024 needs a privilege the units do not give; choose another"
    return ConfigError("http.listen", problem), None
