"""``serve()``: run a :class:`Policy` on already-bound sockets; :class:`ServeHandle` to stop it."""

from __future__ import annotations

import errno
import math
import socket
from collections.abc import Iterable

import trio

from ._context import Context, ServeStats, log
from ._framers import DEFAULT_MAX_MESSAGE_SIZE
from ._policy import Policy
from ._splice import Splicer
from ._tcp import handle_tcp, run_adopted_splice
from ._udp import UdpServer, prepare_udp_socket
from ._verdicts import Drop, Verdict, check_verdict

__all__ = ["ServeHandle", "serve"]

# accept() errors that mean "the system is short of something", not "this listener is broken".
_TRANSIENT_ACCEPT_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# accept() errors caused by a client that gave up while queued; just accept the next one.
_CLIENT_ACCEPT_ERRORS = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM}


class ServeHandle:
    """Handed back by ``await nursery.start(serve, ...)``: statistics and graceful stop.

    :ivar stats: the live :class:`ServeStats` of this server.
    """

    def __init__(self, stats: ServeStats) -> None:
        self.stats = stats
        self._stop = trio.Event()
        self._done = trio.Event()
        self._grace = 10.0

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stop.is_set()

    @property
    def finished(self) -> bool:
        """Whether :func:`serve` has returned (or was cancelled)."""
        return self._done.is_set()

    def stop(self, grace: float = 10.0) -> None:
        """Stop gracefully: accept no new TCP connections or UDP flows, let live ones finish.

        Connections and flows still open ``grace`` seconds later are cancelled (their sockets
        closed); then :func:`serve` returns.  Calling it again has no effect.  Cancelling the scope
        around :func:`serve` instead stops everything at once.
        """
        if not self._stop.is_set():
            self._grace = grace
            self._stop.set()

    async def aclose(self, grace: float = 10.0) -> None:
        """:meth:`stop` and wait until :func:`serve` has returned."""
        self.stop(grace)
        await self._done.wait()


def _check_upstream(upstream: object) -> tuple[str, int | None] | None:
    if upstream is None:
        return None
    ok = isinstance(upstream, tuple) and len(upstream) == 2 and isinstance(upstream[0], str)
    if ok:
        port = upstream[1]
        ok = port is None or (isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536)
    if not ok:
        raise ValueError(f"upstream must be None, (host, port) or (host, None), got {upstream!r}")
    return upstream  # type: ignore[return-value]


def _check_sockets(sockets: Iterable[socket.socket], kind: int, what: str) -> list[socket.socket]:
    result = list(sockets)
    for sock in result:
        if not isinstance(sock, socket.socket) or sock.type != kind:
            raise ValueError(f"{what} must hold socket.socket objects of type {socket.SocketKind(kind).name}")
    return result


async def serve(
    policy: Policy,
    *,
    tcp_sockets: Iterable[socket.socket] = (),
    udp_sockets: Iterable[socket.socket] = (),
    upstream: tuple[str, int | None] | None = None,
    label: str | None = None,
    inspect_timeout: float = 5.0,
    inspect_default: Verdict = Drop(),  # noqa: B008 - verdicts are immutable
    connect_timeout: float = 5.0,
    idle_timeout: float = 300.0,
    udp_flow_timeout: float = 30.0,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    splice: Splicer | None = None,
    task_status: trio.TaskStatus[ServeHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Proxy traffic arriving on the given sockets according to ``policy``.

    Use ``handle = await nursery.start(serve, policy, ...)``: it returns a :class:`ServeHandle` once
    every socket is being served.

    :param tcp_sockets: bound, listening TCP sockets (IPv4, IPv6 or dual-stack).
    :param udp_sockets: bound, unconnected UDP sockets.  ``SO_REUSEADDR`` and
        ``IP(V6)_RECVORIGDSTADDR`` are set on them.
    :param upstream: where :class:`Pass` goes: ``(host, port)``, ``(host, None)`` for "the original
        destination port", or ``None`` for the built-in echo service (TCP bytes come back unchanged,
        UDP datagrams come back from the original destination address and port).
    :param label: copied to :attr:`Connection.label`.
    :param inspect_timeout: seconds a callback may take before ``inspect_default`` applies instead.
    :param connect_timeout: seconds for connecting to a TCP upstream; failure resets the client.
    :param idle_timeout: a TCP connection with no bytes either way for this long is closed (0: never).
    :param udp_flow_timeout: a UDP flow with no datagram either way for this long is forgotten (0: never).
    :param max_message_size: the ``max_size`` of framers that leave it ``None``, and the largest UDP
        datagram a message callback is shown; a larger message closes its connection.
    :param splice: an open :class:`Splicer`: connections that get ``Pass(splice=True)``,
        ``Redirect(..., splice=True)`` or ``Splice()`` are handed to the kernel.  Open it before creating
        the listening sockets (docs/splice.md); the caller closes it after serve() returns.  None: the
        same verdicts relay in userspace, uninspected.

    Resources: the given sockets stay owned by the caller -- serve() sets them non-blocking (plus the
    UDP options above) and never closes them; close them after serve() returns.  Every socket
    serve() creates (accepted, upstream, per-flow) is closed before it returns, also on cancellation.

    Errors: a callback that raises, returns a non-verdict, or sees an oversized/malformed message
    closes only its own connection (logged on ``sockpolicy.proxy``).  serve() itself raises
    :exc:`ValueError` for bad arguments and :exc:`OSError` if a served socket fails for a
    non-transient reason (e.g. it was closed under it).

    Stopping: cancel the enclosing scope for an immediate stop, or call :meth:`ServeHandle.stop` to
    drain: listeners stop at once, live connections and flows get ``grace`` seconds, and serve()
    returns when they are all done.
    """
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a Policy, got {policy!r}")
    inspect_default = check_verdict(inspect_default, "inspect_default")
    if isinstance(max_message_size, bool) or not isinstance(max_message_size, int) or max_message_size < 1:
        raise ValueError(f"max_message_size must be a positive int, got {max_message_size!r}")
    for name, value in (
        ("inspect_timeout", inspect_timeout),
        ("connect_timeout", connect_timeout),
        ("idle_timeout", idle_timeout),
        ("udp_flow_timeout", udp_flow_timeout),
    ):
        if not isinstance(value, int | float) or value < 0 or math.isnan(value):
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    ctx = Context(
        policy=policy,
        upstream=_check_upstream(upstream),
        label=label,
        inspect_timeout=inspect_timeout,
        inspect_default=inspect_default,
        connect_timeout=connect_timeout,
        idle_timeout=idle_timeout,
        udp_flow_timeout=udp_flow_timeout,
        max_message_size=max_message_size,
        stats=ServeStats(),
        splicer=splice,
    )
    if splice is not None and not isinstance(splice, Splicer):
        raise TypeError(f"splice must be a Splicer or None, got {splice!r}")
    tcp = [
        trio.socket.from_stdlib_socket(s)
        for s in _check_sockets(tcp_sockets, socket.SOCK_STREAM, "tcp_sockets")
    ]
    udp_std = _check_sockets(udp_sockets, socket.SOCK_DGRAM, "udp_sockets")
    for sock in udp_std:
        prepare_udp_socket(sock)  # before started(): the first datagram must carry its cmsg
    udp = [trio.socket.from_stdlib_socket(s) for s in udp_std]

    handle = ServeHandle(ctx.stats)
    try:
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as listeners:
                udp_server = UdpServer(ctx, connections)
                for lsock in tcp:
                    listeners.start_soon(_accept_loop, ctx, lsock, connections)
                for usock in udp:
                    listeners.start_soon(udp_server.read_socket, usock)
                listeners.start_soon(_stop_listeners, handle, listeners.cancel_scope)
                if splice is not None:
                    # Frees the slots of closed sockets; stops with the listeners (Splicer.close cleans up).
                    listeners.start_soon(splice.run_sweeper)
                    # Restart: spliced connections the predecessor handed over (sockpolicy serve).
                    for pair in splice.take_adopted_pairs():
                        connections.start_soon(run_adopted_splice, ctx, pair)
                log.info("serving %d TCP and %d UDP sockets (label=%r)", len(tcp), len(udp), label)
                task_status.started(handle)
            # Only reached after stop(): drain, then cancel what is left.
            log.info("draining %d connections for up to %gs", ctx.stats.connections_active, handle._grace)
            connections.cancel_scope.deadline = trio.current_time() + handle._grace
        log.info("stopped")
    finally:
        handle._done.set()


async def _stop_listeners(handle: ServeHandle, scope: trio.CancelScope) -> None:
    await handle._stop.wait()
    scope.cancel()


async def _accept_loop(ctx: Context, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
    while True:
        try:
            sock, peer = await listener.accept()
        except OSError as exc:
            if exc.errno in _CLIENT_ACCEPT_ERRORS:
                continue
            if exc.errno in _TRANSIENT_ACCEPT_ERRORS:
                log.error("accept() failed: %s; retrying in 100ms", exc)
                await trio.sleep(0.1)
                continue
            raise
        nursery.start_soon(_guarded_tcp, ctx, sock, peer)


async def _guarded_tcp(ctx: Context, sock: trio.socket.SocketType, peer: tuple[object, ...]) -> None:
    try:
        await handle_tcp(ctx, sock, peer)
    except Exception:
        # A bug in the proxy itself: lose this connection, keep the server.
        log.exception("internal error handling a TCP connection from %s", peer)
