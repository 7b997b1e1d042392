"""Run a command the way a systemd unit's settings run it, without systemd: for the tests that
imitate the units (tests/test_operator.py). Run as root:

    python tests/unit_sandbox.py SETTINGS_JSON -- COMMAND ARGS...

SETTINGS_JSON (a JSON object) says what to apply before exec'ing COMMAND, in systemd's order:

- ``umask``: ``UMask=`` (an octal string);
- ``uid``: ``DynamicUser=yes``: this user and a group of the same number, no supplementary groups;
- ``no_new_privs``: ``NoNewPrivileges=yes`` (needed for a seccomp filter without privileges);
- ``allow``: ``SystemCallFilter=``, the system calls allowed (groups expanded, the ``~`` lists
  taken out); every other call fails with ``errno`` (``SystemCallErrorNumber=``) or kills the
  process when it is null, as systemd's filter does;
- ``mdwe``: ``MemoryDenyWriteExecute=yes``: no mapping both writable and executable, no
  ``mprotect``/``pkey_mprotect`` adding execution, no ``shmat`` with ``SHM_EXEC`` (EPERM);
- ``families``: ``RestrictAddressFamilies=``: ``socket()`` of any other family fails with
  EAFNOSUPPORT.

Filters are built with libseccomp (``libseccomp.so.2``, the library systemd uses).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import sys
from typing import Any

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
SCMP_CMP_MASKED_EQ = 7
PR_SET_NO_NEW_PRIVS = 38
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
AF_MAX = 46


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def _lib() -> Any:
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def _rule(lib: Any, ctx: int, action: int, name: str, *cmps: tuple[int, int, int, int]) -> None:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:  # not a system call of this architecture
        return
    arr = (_ArgCmp * max(len(cmps), 1))(*(_ArgCmp(*c) for c in cmps))
    rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
    if rc < 0 and -rc != errno.EEXIST:
        raise OSError(-rc, f"seccomp_rule_add {name}: {os.strerror(-rc)}")


def _load(lib: Any, ctx: int) -> None:
    rc = lib.seccomp_load(ctx)
    lib.seccomp_release(ctx)
    if rc < 0:
        raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")


def apply(settings: dict[str, Any]) -> None:
    if "umask" in settings:
        os.umask(int(settings["umask"], 8))
    uid = settings.get("uid")
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    if settings.get("no_new_privs"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    lib = None
    if settings.get("mdwe") or settings.get("families"):
        lib = _lib()
        ctx = lib.seccomp_init(SCMP_ACT_ALLOW)  # (stacked filters: the strictest answer wins)
        deny = _errno_action(errno.EPERM)
        if settings.get("mdwe"):
            wx = PROT_WRITE | PROT_EXEC
            _rule(lib, ctx, deny, "mmap", (2, SCMP_CMP_MASKED_EQ, wx, wx))
            _rule(lib, ctx, deny, "mprotect", (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
            _rule(lib, ctx, deny, "pkey_mprotect", (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
            _rule(lib, ctx, deny, "shmat", (2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
        if settings.get("families"):
            allowed = {int(getattr(socket, name)) for name in settings["families"]}
            for family in range(AF_MAX):
                if family not in allowed:
                    _rule(lib, ctx, _errno_action(errno.EAFNOSUPPORT), "socket",
                          (0, SCMP_CMP_EQ, family, 0))
        _load(lib, ctx)
    # the system call filter last, as systemd does: it may not allow loading another
    if settings.get("allow") is not None:
        lib = lib or _lib()
        code = settings.get("errno")
        ctx = lib.seccomp_init(SCMP_ACT_KILL_PROCESS if code is None else _errno_action(code))
        for name in settings["allow"]:
            _rule(lib, ctx, SCMP_ACT_ALLOW, name)
        _load(lib, ctx)


def main(argv: list[str]) -> None:
    settings = json.loads(argv[0])
    if argv[1] != "--":
        raise SystemExit("usage: unit_sandbox.py SETTINGS_JSON -- COMMAND ARGS...")
    command = argv[2:]
    apply(settings)
    os.execv(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
