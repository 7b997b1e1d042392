"""What ``cometstream check`` verifies beyond the configuration's syntax: that the places
``run`` writes to can be created and written.

- ``state.dir``: a directory (created with its parents if missing) the daemon can write in;
- each file sink's ``path`` and each sink's ``dead_letter``: a file that can be created (its
  folder too) or appended to.

The answer is for the user running ``check`` (the units run the daemon as their own dynamic
user: as root, ``check`` cannot see what that user may write). ``run`` uses the same words when
``state.dir`` fails at start: "not a directory", never the system's "File exists".
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .config import Config
from .errors import ConfigError

__all__ = ["check_paths", "dir_problem", "file_problem"]


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


def check_paths(cfg: Config) -> list[ConfigError]:
    """One error per place ``run`` could not write, naming its key."""
    errors = []
    problem = dir_problem(cfg.state.dir)
    if problem is not None:
        errors.append(ConfigError("state.dir", problem))
    for sc in cfg.sinks:
        paths = []
        if sc.type == "file":
            paths.append(("path", sc.section().path("path")))
        paths.append(("dead_letter", sc.dead_letter))
        for key, path in paths:
            if path is None:
                continue
            problem = file_problem(path)
            if problem is not None:
                errors.append(ConfigError(f"sinks.{sc.name}.{key}", problem))
    return errors
