"""``serve --user NAME``: drop root after setup, keeping only the capabilities still needed.

After setup ``serve`` needs **no** capability (measured on kernel 6.18, see docs/security.md): the proxy
only accepts, reads, writes and connects on sockets it already has; the metrics endpoint and the handoff
socket are bound before the drop.  BPF map operations through fds opened before the drop would still work
(since Linux 6.5 they need no capability), but the dispatcher's writer lock stats the root-only state
directory, so an unprivileged ``serve`` does not change the pinned state at exit: it leaves its bindings
(their connections are refused until the next ``serve`` of the label takes them over) and cannot handle a
policy file only root may read on SIGHUP (the reload fails and the old policy stays).

:func:`drop_privileges` can still keep capabilities (``keep``) for embedders that need them; it uses
``prctl(PR_SET_KEEPCAPS)`` and ``capset(2)`` through ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pwd
from collections.abc import Iterable
from pathlib import Path

__all__ = ["CAPS", "capabilities", "drop_privileges", "resolve_user"]

PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

#: capability numbers by name (linux/capability.h), for ``keep`` and for messages.
CAPS = {
    "CAP_DAC_OVERRIDE": 1,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_ADMIN": 12,
    "CAP_SYS_ADMIN": 21,
    "CAP_BPF": 39,
}


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def resolve_user(name: str) -> pwd.struct_passwd:
    """The passwd entry of ``name`` (or a numeric uid).

    :raises ConfigError: no such user.
    """
    from ._serve import ConfigError

    try:
        return pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"invalid --user {name!r}: no such user") from None


def capabilities(pid: int | str = "self") -> dict[str, int]:
    """``CapInh``, ``CapPrm``, ``CapEff``, ``CapBnd``, ``CapAmb`` of a process as bit masks."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cap"):
            key, value = line.split(":", 1)
            out[key] = int(value, 16)
    return out


def drop_privileges(user: str, keep: Iterable[int] = ()) -> None:
    """Become ``user`` (uid, primary gid, no supplementary groups), keeping only ``keep`` capabilities.

    Also sets ``PR_SET_NO_NEW_PRIVS`` so nothing executed later can regain privileges.

    :raises OSError: a step failed (the process must then not continue serving).
    """
    entry = resolve_user(user)
    kept = sorted(set(keep))
    if kept:
        # Without KEEPCAPS, setuid() from 0 to non-zero clears the permitted set.
        _check(_libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    if kept:
        data = (_CapData * 2)()
        for cap in kept:
            data[cap // 32].effective |= 1 << (cap % 32)
            data[cap // 32].permitted |= 1 << (cap % 32)
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        _check(_libc.capset(ctypes.byref(header), data), "capset")
        _check(_libc.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    if (
        os.getuid() != entry.pw_uid
        or os.geteuid() != entry.pw_uid
        or (entry.pw_uid != 0 and _can_regain_root())
    ):
        raise OSError(f"dropping privileges to {user!r} did not stick")


def _can_regain_root() -> bool:
    try:
        os.setuid(0)
    except PermissionError:
        return False
    return True
