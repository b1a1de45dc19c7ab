"""The :class:`Policy` registry and the machinery that runs its callbacks under a time limit."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from ._connection import Connection, Direction, Message
from ._framers import Framer, RawFramer
from ._match import AddrsSpec, Matcher, PortsSpec
from ._verdicts import Close, Drop, Pass, Redirect, Rewrite, Splice, Verdict, check_verdict

__all__ = ["ConnectCallback", "MessageCallback", "Policy"]

log = logging.getLogger("sockpolicy.proxy")

ConnectCallback = Callable[[Connection], Verdict | Awaitable[Verdict]]
MessageCallback = Callable[[Connection, Message], Verdict | Awaitable[Verdict]]
_C = TypeVar("_C", bound=Callable[..., Any])
_VERDICT_CLASSES = frozenset((Pass, Drop, Redirect, Rewrite, Close, Splice))


@dataclass(frozen=True, slots=True)
class _ConnectRule:
    matcher: Matcher
    fn: ConnectCallback


@dataclass(frozen=True, slots=True)
class _MessageRule:
    matcher: Matcher
    fn: MessageCallback
    framer: Framer
    direction: Direction | None


class Policy:
    """An ordered set of verdict callbacks.

    Callbacks may be plain functions or ``async`` functions; they are called in the proxy's trio
    event loop, so a plain function must be quick (it cannot be interrupted; if it overruns
    ``inspect_timeout`` its verdict is replaced by ``inspect_default`` all the same).  A callback must
    return one of the verdict objects -- returning anything else, or raising, closes that connection
    only (logged on ``sockpolicy.proxy``).

    Filters (all optional, all must match): ``ports`` -- the ORIGINAL destination port (an int, a
    string like ``"80,443,8000-8999"``, or an iterable of ints and ``(lo, hi)`` tuples); ``addrs`` --
    original destination prefixes (``"127.0.0.0/8"``, comma-separated strings, ``ipaddress``
    networks); ``proto`` -- ``"tcp"`` or ``"udp"``.  Filters are parsed at registration, so a bad
    filter raises :exc:`ValueError` at import time rather than per connection.

    A policy may be shared by several :func:`serve` calls; it holds no per-connection state.
    """

    def __init__(self) -> None:
        self._connect: list[_ConnectRule] = []
        self._message: list[_MessageRule] = []

    def on_connect(
        self, ports: PortsSpec | None = None, addrs: AddrsSpec | None = None, proto: str | None = None
    ) -> Callable[[_C], _C]:
        """Register ``fn(conn) -> verdict``, run once per TCP connection / new UDP flow.

        The first registered callback whose filters match decides; without one the verdict is
        :class:`Pass`.  :raises ValueError: on a malformed filter.
        """
        matcher = Matcher.build(ports, addrs, proto)

        def register(fn: _C) -> _C:
            if not callable(fn):
                raise TypeError(f"on_connect callback must be callable, got {fn!r}")
            self._connect.append(_ConnectRule(matcher, fn))
            return fn

        return register

    def on_message(
        self,
        ports: PortsSpec | None = None,
        addrs: AddrsSpec | None = None,
        proto: str | None = None,
        framer: Framer | None = None,
        direction: Direction | None = None,
    ) -> Callable[[_C], _C]:
        """Register ``fn(conn, msg) -> verdict``, run for every message.

        For each connection and direction, the first registered callback whose filters (including
        ``direction``) match is the only one used; its ``framer`` template (default
        :class:`RawFramer`) frames that direction of the TCP stream.  UDP is not framed: each datagram
        is one message.  :raises ValueError: on a malformed filter or a framer that is not lossless.
        """
        matcher = Matcher.build(ports, addrs, proto)
        if framer is None:
            framer = RawFramer()
        if not isinstance(framer, Framer):
            raise TypeError(f"framer must be a Framer instance (a template), got {framer!r}")
        if not framer.lossless:
            raise ValueError(f"{framer!r} drops bytes; the proxy forwards messages verbatim")
        if direction is not None and not isinstance(direction, Direction):
            raise ValueError(f"direction must be a Direction or None, got {direction!r}")

        def register(fn: _C) -> _C:
            if not callable(fn):
                raise TypeError(f"on_message callback must be callable, got {fn!r}")
            self._message.append(_MessageRule(matcher, fn, framer, direction))
            return fn

        return register

    # -- used by the proxy ------------------------------------------------------------------------

    def _connect_rule(self, conn: Connection) -> _ConnectRule | None:
        for rule in self._connect:
            if rule.matcher.matches(conn.proto, conn.original_dst):
                return rule
        return None

    def _message_rule(self, conn: Connection, direction: Direction) -> _MessageRule | None:
        for rule in self._message:
            if rule.direction in (None, direction) and rule.matcher.matches(conn.proto, conn.original_dst):
                return rule
        return None


async def run_callback(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    timeout: float,
    default: Verdict,
    conn: Connection,
    what: str,
) -> tuple[Verdict, bool]:
    """Call ``fn(*args)``; return ``(verdict, timed_out)``.

    If the callback takes longer than ``timeout`` the verdict is ``default`` and ``timed_out`` is true.

    :raises Exception: whatever the callback raised, or :exc:`TypeError` for a non-verdict result;
        the caller closes the connection.
    """
    started = trio.current_time()
    return await settle_result(fn(*args), fn, started, timeout, default, conn, what)


async def settle_result(
    result: Any,
    fn: Callable[..., Any],
    started: float,
    timeout: float,
    default: Verdict,
    conn: Connection,
    what: str,
) -> tuple[Verdict, bool]:
    """The second half of :func:`run_callback`: ``result`` is what ``fn`` returned when called at
    ``started`` (trio's clock).  An awaitable result is awaited under ``timeout``; a plain one that took
    longer than ``timeout`` to compute is replaced by ``default``."""
    if inspect.isawaitable(result):
        with trio.move_on_after(timeout) as scope:
            result = await result
        if scope.cancelled_caught:
            log.warning("%r: %s callback timed out after %.3gs; applying %r", conn, what, timeout, default)
            return default, True
    elif trio.current_time() - started > timeout:
        # A plain function cannot be interrupted, but the documented semantics still hold.
        log.warning("%r: %s callback overran %.3gs; applying %r", conn, what, timeout, default)
        return default, True
    if type(result) in _VERDICT_CLASSES:
        return result, False
    return check_verdict(result, f"{what} callback {getattr(fn, '__qualname__', fn)!r}"), False
