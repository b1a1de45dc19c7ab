"""Per-server configuration and counters shared by the TCP and UDP halves of :func:`serve`."""

from __future__ import annotations

import collections
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._framers import Framer
from ._policy import Policy
from ._verdicts import Verdict, verdict_kind

__all__ = ["LiveConnection", "ServeStats", "callback_name", "tcp_bytes"]

log = logging.getLogger("sockpolicy.proxy")
#: One summary line per connection at close, and periodic lines for long-lived ones (docs/operations.md).
conn_log = logging.getLogger("sockpolicy.conn")

# struct tcp_info (linux/tcp.h): tcpi_bytes_acked and tcpi_bytes_received are u64s at offsets 120 and 128
# (since Linux 4.1/4.2).  Read from the kernel rather than counted in the relay, so that the numbers are
# exact per connection and also cover bytes the relay never sees (spliced connections).
_TCPI_BYTES = struct.Struct("=QQ")
_TCPI_BYTES_OFFSET = 120
_TCP_INFO_LEN = _TCPI_BYTES_OFFSET + _TCPI_BYTES.size


def tcp_bytes(sock: Any) -> tuple[int, int] | None:
    """``(bytes received from the peer, bytes sent and acknowledged by the peer)`` of a TCP socket.

    ``None`` if the socket is closed or is not TCP.
    """
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except (OSError, ValueError, AttributeError):
        return None
    if len(raw) < _TCP_INFO_LEN:
        return None
    acked, received = _TCPI_BYTES.unpack_from(raw, _TCPI_BYTES_OFFSET)
    # Both count sequence space, in which a FIN takes one byte: take it off where the state says a FIN
    # was received (TIME_WAIT, CLOSE, CLOSE_WAIT, LAST_ACK, CLOSING) or ours was acked (FIN_WAIT2,
    # TIME_WAIT, CLOSE).  CLOSE after a reset is off by one; the summary is for people, not billing.
    state = raw[0]
    received -= received > 0 and state in (6, 7, 8, 9, 11)
    acked -= acked > 0 and state in (5, 6, 7)
    return received, acked


def callback_name(fn: Callable[..., Any]) -> str:
    """A stable name for a callback in metrics: ``__sockpolicy_name__`` if set, else its qualname."""
    name = getattr(fn, "__sockpolicy_name__", None) or getattr(fn, "__qualname__", None)
    return str(name or type(fn).__name__)


@dataclass
class LiveConnection:
    """A connection the proxy is serving, for the close summary and the periodic log line."""

    conn: Any  # sockpolicy.proxy.Connection
    sock: Any  # the client socket (TCP) or None (UDP)
    started: float = field(default_factory=time.monotonic)
    last_report: float = field(default_factory=time.monotonic)


#: recv() size for TCP relaying and UDP upstream sockets.
RECV_SIZE = 65536


@dataclass
class ServeStats:
    """Plain counters of one :func:`serve` call (read them via :attr:`ServeHandle.stats`).

    A "connection" is a TCP connection or a UDP flow.  Byte counters count payload bytes:
    ``bytes_from_client``/``bytes_from_upstream`` as received, ``bytes_to_upstream``/``bytes_to_client``
    as forwarded after verdicts (so drops and rewrites show up as a difference).
    """

    connections_accepted: int = 0
    connections_active: int = 0
    connections_closed: int = 0
    #: verdicts applied, by kind: ``"pass"``, ``"drop"``, ``"redirect"``, ``"rewrite"``, ``"close"``.
    verdicts: collections.Counter[str] = field(default_factory=collections.Counter)
    #: connections closed because of a callback error, an oversized/malformed message or I/O error.
    errors: int = 0
    #: callbacks that overran ``inspect_timeout`` (``inspect_default`` applied instead).
    inspect_timeouts: int = 0
    bytes_from_client: int = 0
    bytes_to_upstream: int = 0
    bytes_from_upstream: int = 0
    bytes_to_client: int = 0
    #: UDP datagrams discarded because a flow's queue was full or they were truncated.
    datagrams_dropped: int = 0
    #: verdicts by ``(callback name, kind)``; only verdicts a callback returned (no default ``Pass``).
    callback_verdicts: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    #: failed upstream connects by reason: ``"refused"``, ``"timeout"``, ``"error"``.
    upstream_failures: collections.Counter[str] = field(default_factory=collections.Counter)
    #: connections by protocol (``"tcp"``/``"udp"``), as accepted.
    connections_by_proto: collections.Counter[str] = field(default_factory=collections.Counter)
    #: payload bytes moved by kernel splicing rather than the relay (for the splice engine to add to).
    bytes_spliced: int = 0
    #: connections being served, by :attr:`Connection.id`.
    live: dict[int, LiveConnection] = field(default_factory=dict, repr=False)

    def count_verdict(self, verdict: Verdict) -> None:
        self.verdicts[verdict_kind(verdict)] += 1

    def count_callback(self, fn: Callable[..., Any], verdict: Verdict) -> None:
        """Count a verdict per callback (called by the TCP/UDP handlers right after each callback)."""
        self.callback_verdicts[callback_name(fn), verdict_kind(verdict)] += 1

    def upstream_failed(self, exc: BaseException) -> None:
        """Count a failed upstream connect (refused, timed out, other error)."""
        if _caused_by(exc, ConnectionRefusedError):
            reason = "refused"
        elif isinstance(exc, TimeoutError) or type(exc).__name__ == "TooSlowError":
            reason = "timeout"
        else:
            reason = "error"
        self.upstream_failures[reason] += 1

    def conn_opened(self, conn: Any, sock: Any = None) -> None:
        """A connection (or UDP flow) starts being served; ``sock`` is the client TCP socket."""
        self.connections_by_proto[conn.proto] += 1
        self.live[conn.id] = LiveConnection(conn, sock)

    def conn_closed(self, conn: Any, end: BaseException | str | None = None, reset: bool = False) -> None:
        """Log the one-line summary of a connection that is about to close (its socket still open)."""
        live = self.live.pop(conn.id, None)
        if live is None or not conn_log.isEnabledFor(logging.INFO):
            return
        reason = str(end) if end else "closed"
        fields = _conn_fields(live, time.monotonic())
        fields.update(event="conn_close", reason=reason, close="rst" if reset else "fin")
        conn_log.info(
            "%s closed after %.3fs%s: %s",
            conn,
            fields["duration_s"],
            _bytes_text(fields),
            reason,
            extra=fields,
        )

    def report_long_lived(self, interval: float, now: float | None = None) -> int:
        """Log one line per connection that has been open for ``interval`` seconds since its last line.

        :returns: how many lines were logged.
        """
        if interval <= 0 or not conn_log.isEnabledFor(logging.INFO):
            return 0
        now = time.monotonic() if now is None else now
        count = 0
        for live in list(self.live.values()):
            if now - live.last_report < interval:
                continue
            live.last_report = now
            fields = _conn_fields(live, now)
            fields["event"] = "conn_open"
            conn_log.info(
                "%s open for %.0fs%s", live.conn, fields["duration_s"], _bytes_text(fields), extra=fields
            )
            count += 1
        return count


def _caused_by(exc: BaseException | None, kind: type[BaseException], depth: int = 0) -> bool:
    """Whether ``exc`` is, or was caused by, a ``kind`` (trio's open_tcp_stream wraps the real errors
    of its attempts in a plain OSError caused by an exception group)."""
    if exc is None or depth > 5:
        return False
    if isinstance(exc, kind):
        return True
    if isinstance(exc, BaseExceptionGroup) and any(_caused_by(e, kind, depth + 1) for e in exc.exceptions):
        return True
    return _caused_by(exc.__cause__ or exc.__context__, kind, depth + 1)


def _conn_fields(live: LiveConnection, now: float) -> dict[str, Any]:
    conn = live.conn
    fields: dict[str, Any] = {
        "conn_id": conn.id,
        "proto": conn.proto,
        "client": f"{conn.client[0]}:{conn.client[1]}",
        "original_dst": f"{conn.original_dst[0]}:{conn.original_dst[1]}",
        "label": conn.label,
        "upstream": f"{conn.upstream[0]}:{conn.upstream[1]}" if conn.upstream else None,
        "duration_s": round(now - live.started, 3),
    }
    counted = tcp_bytes(live.sock) if live.sock is not None else None
    if counted is not None:
        fields["bytes_from_client"], fields["bytes_to_client"] = counted
    return fields


def _bytes_text(fields: dict[str, Any]) -> str:
    if "bytes_from_client" not in fields:
        return ""
    return f", {fields['bytes_from_client']}B from client, {fields['bytes_to_client']}B to client"


@dataclass
class Context:
    """Everything a connection handler needs; built once per :func:`serve` call."""

    policy: Policy
    upstream: tuple[str, int | None] | None
    label: str | None
    inspect_timeout: float
    inspect_default: Verdict
    connect_timeout: float
    idle_timeout: float
    udp_flow_timeout: float
    max_message_size: int
    stats: ServeStats
    #: the kernel splicing engine (a ``sockpolicy.proxy.Splicer``), or None: everything in userspace
    splicer: Any = None

    def upstream_for(self, original_dst: tuple[str, int]) -> tuple[str, int] | None:
        """The configured upstream for a connection (``None``: the built-in echo service)."""
        if self.upstream is None:
            return None
        host, port = self.upstream
        return host, port if port is not None else original_dst[1]

    def new_framer(self, template: Framer) -> Framer:
        return self.fill_max(template.clone())

    def fill_max(self, framer: Framer) -> Framer:
        # max_size=None on a template means "whatever serve() was given".
        if framer.max_size is None:
            framer.max_size = self.max_message_size
        return framer
