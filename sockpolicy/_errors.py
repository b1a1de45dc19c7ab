"""The exception hierarchy, and the one place where an errno becomes a typed exception.

Every error raised by sockpolicy derives from :class:`SockpolicyError`.  Errors that come from the kernel
carry the errno, the operation that failed and the context (map name, program name, path, ...), so that
a message reads like ``map_update(map='bindings', key=...): key already exists (EEXIST)``.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Mapping
from typing import Any

# errno 524 is the kernel's internal ENOTSUPP, which leaks to userspace from some BPF commands.
ENOTSUPP = 524

# Capability numbers, from <linux/capability.h>.
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_BPF = 39
_CAP_NAMES = {CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_SYS_ADMIN: "CAP_SYS_ADMIN", CAP_BPF: "CAP_BPF"}


class SockpolicyError(Exception):
    """Base class of every sockpolicy error."""


class BpfError(SockpolicyError, OSError):
    """A BPF system call or libbpf function failed.

    :ivar errno: the positive errno value.
    :ivar op: the operation, e.g. ``"map_update"``.
    :ivar context: what the operation was applied to (map or program name, path, key, ...).
    """

    def __init__(
        self, errno: int, op: str, context: Mapping[str, Any] | None = None, detail: str = ""
    ) -> None:
        self.op = op
        self.context = dict(context or {})
        self.detail = detail
        super().__init__(errno, _describe(errno))
        self.errno = errno

    #: a description that reads better than strerror() for this class (e.g. "key not found" for ENOENT)
    reason: str | None = None

    def __str__(self) -> str:
        ctx = ", ".join(f"{k}={v!r}" for k, v in self.context.items())
        where = f"{self.op}({ctx})" if ctx else self.op
        code = _errno.errorcode.get(self.errno, "ENOTSUPP" if self.errno == ENOTSUPP else str(self.errno))
        text = f"{where}: {self.reason or _describe(self.errno)} ({code})"
        if self.detail:
            text += f": {self.detail}"
        return text


class KeyNotFound(BpfError, KeyError):
    """The key is not in the map, or the pinned object does not exist (ENOENT).

    Also a :class:`KeyError` (hence a :class:`LookupError`), so that ``except KeyError`` around
    ``typed_map[key]`` works as with a dict; :meth:`BpfError.__str__` keeps the message readable (KeyError's
    own ``__str__`` would print the repr of the first argument).
    """

    reason = "not found"


class KeyExists(BpfError):
    """The key is already in the map and the update asked for ``NOEXIST`` (EEXIST)."""

    reason = "already exists"


class MapFull(BpfError):
    """The map has no room for another key (E2BIG)."""

    reason = "map is full"


class PermissionDenied(BpfError, PermissionError):
    """The caller lacks a capability (EPERM/EACCES); the message names which."""


class NotSupported(BpfError):
    """The running kernel lacks a feature.

    :ivar feature: what is missing, e.g. ``"SK_LOOKUP programs"``.
    :ivar min_kernel: the first kernel version that has it, e.g. ``"5.9"``.
    """

    def __init__(
        self,
        errno: int,
        op: str,
        context: Mapping[str, Any] | None = None,
        *,
        feature: str = "",
        min_kernel: str = "",
    ) -> None:
        self.feature = feature
        self.min_kernel = min_kernel
        detail = ""
        if feature:
            detail = f"{feature} not supported by kernel {os.uname().release}"
            if min_kernel:
                detail += f" (needs Linux >= {min_kernel})"
        super().__init__(errno, op, context, detail)


class InvalidArgument(BpfError, ValueError):
    """The kernel rejected an argument (EINVAL); the context says which object and operation."""


class Busy(BpfError):
    """The target already has a conflicting program attached (EBUSY)."""


class BadFileDescriptor(BpfError):
    """The file descriptor is closed or of the wrong kind (EBADF)."""


class LoadError(SockpolicyError):
    """A BPF object failed to load.

    :ivar log: everything libbpf and the verifier said during the load.
    """

    def __init__(self, message: str, log: str = "", errno: int = 0) -> None:
        super().__init__(message if not log else f"{message}\n{log}")
        self.message = message
        self.log = log
        self.errno = errno


class VerifierError(LoadError):
    """The BPF verifier rejected a program; :attr:`log` holds the verifier log."""


class BadSocket(SockpolicyError, ValueError):
    """A socket of the wrong kind or state was given.

    Raised by the checks in :mod:`sockpolicy.maps` before the kernel sees the socket (``errno`` 0), and by
    :meth:`sockpolicy.Map.update` on a SOCKMAP/SOCKHASH when the kernel refuses the socket with EOPNOTSUPP
    (``errno`` set): that errno there means "this socket cannot go into a socket map", not "old kernel".

    :ivar errno: the kernel's errno, or 0 when the check happened in userspace.
    """

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class ClosedError(SockpolicyError, ValueError):
    """The object's file descriptor was already closed."""


class NotLoaded(SockpolicyError):
    """No pinned sockpolicy state exists for this network namespace."""


class BpffsNotMounted(SockpolicyError):
    """bpffs is not mounted where sockpolicy pins its state."""


def _describe(errno: int) -> str:
    if errno == ENOTSUPP:
        return "operation not supported"
    return os.strerror(errno).lower() if errno else "unknown error"


def effective_capabilities() -> int:
    """Return the effective capability mask of this process (0 if unknown)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def missing_capabilities(needed: tuple[int, ...] = (CAP_BPF, CAP_NET_ADMIN)) -> list[str]:
    """Names of the capabilities in ``needed`` that this process does not have."""
    caps = effective_capabilities()
    # CAP_SYS_ADMIN implies CAP_BPF for every BPF command sockpolicy uses.
    have_sys_admin = bool(caps & (1 << CAP_SYS_ADMIN))
    missing = []
    for cap in needed:
        if caps & (1 << cap):
            continue
        if cap == CAP_BPF and have_sys_admin:
            continue
        missing.append(_CAP_NAMES.get(cap, f"capability {cap}"))
    return missing


def from_errno(
    errno: int,
    op: str,
    context: Mapping[str, Any] | None = None,
    *,
    feature: str = "",
    min_kernel: str = "",
) -> BpfError:
    """Turn a failed call's errno into the matching typed exception.

    :param feature: for operations that can fail because the kernel is too old, the feature's name;
        EINVAL/EOPNOTSUPP/ENOTSUPP then become :class:`NotSupported` when ``feature`` is given.
    """
    errno = abs(errno)
    if errno == _errno.ENOENT:
        return KeyNotFound(errno, op, context)
    if errno == _errno.EEXIST:
        return KeyExists(errno, op, context)
    if errno == _errno.E2BIG:
        return MapFull(errno, op, context)
    if errno in (_errno.EPERM, _errno.EACCES):
        missing = missing_capabilities()
        detail = ""
        if missing:
            # "run as root" only helps a non-root caller; root without the capability needs them granted.
            hint = "run as root" if os.geteuid() != 0 else "root, but they were dropped from this process"
            detail = f"missing capability {' and '.join(missing)} ({hint})"
        return PermissionDenied(errno, op, context, detail)
    if errno in (ENOTSUPP, _errno.EOPNOTSUPP) or (feature and errno == _errno.EINVAL):
        return NotSupported(errno, op, context, feature=feature, min_kernel=min_kernel)
    if errno == _errno.EINVAL:
        return InvalidArgument(errno, op, context)
    if errno == _errno.EBUSY:
        return Busy(errno, op, context)
    if errno == _errno.EBADF:
        return BadFileDescriptor(errno, op, context)
    return BpfError(errno, op, context)
